package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecode checks that no input makes the control decoder panic, and that
// whatever it accepts survives an encode/decode round trip.
func FuzzDecode(f *testing.F) {
	for _, m := range []Message{
		validHello(),
		&HelloAck{Version: 1, Protocol: ProtocolYamux},
		&Register{Seq: 1, Services: []Service{{ID: "redis", Protocol: "tcp", Port: 6379}}},
		&RegisterAck{Seq: 1, Endpoints: []Endpoint{{ID: "redis", Protocol: "tcp", PublicPort: 16379}}},
		&Heartbeat{Seq: 1, TS: 2},
		&Open{Kind: KindUDP, ID: 3, Service: "dns", Client: "127.0.0.1:9"},
		&Data{Kind: KindTCP, ID: 3, Data: []byte("abc")},
		&Close{Kind: KindTCP, ID: 3, Half: true},
		&Credit{ID: 3, Bytes: 10},
	} {
		b, err := Encode(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"type":"tcp_data","id":1,"data":"=="}`))
	f.Add([]byte(`{"type":"tcp_data","id":01,"data":"AAAA"}`))
	f.Add([]byte(`{"type":"credit","id":4294967295,"bytes":1}`))
	f.Add([]byte(`{"type":"credit","id":1,"bytes":0}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		// The fast credit decoder must agree with encoding/json on
		// whatever it accepts.
		if id, n, ok := ParseCreditFast(b); ok {
			var c Credit
			if err := json.Unmarshal(b, &c); err != nil || c.ID != id || c.Bytes != n {
				t.Fatalf("ParseCreditFast(%q) = %d, %d; encoding/json: %+v, %v", b, id, n, c, err)
			}
		}
		m, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrBadMessage) {
				t.Fatalf("error not wrapping ErrBadMessage: %v", err)
			}
			return
		}
		again, err := Encode(m)
		if err != nil {
			t.Fatalf("accepted %q but cannot encode it: %v", b, err)
		}
		if _, err := Decode(again); err != nil {
			t.Fatalf("re-encoding of %q does not decode: %v", b, err)
		}
	})
}

// FuzzReadHeader checks the stream header decoder: no panic, and every
// accepted header re-encodes to the bytes it was read from.
func FuzzReadHeader(f *testing.F) {
	b, _ := AppendHeader(nil, StreamHeader{Kind: KindTCP, Service: "ns/gw/pg"})
	f.Add(b)
	f.Add([]byte{1, 2, 0, 1, 'x', 14, '1', '2', '7', '.', '0', '.', '0', '.', '1', ':', '8', '0', '8', '0'})
	f.Add([]byte{1, 1, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := ReadHeader(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("error not wrapping ErrBadHeader: %v", err)
			}
			return
		}
		out, err := AppendHeader(nil, h)
		if err != nil {
			t.Fatalf("accepted header %+v does not encode: %v", h, err)
		}
		// The client address may be spelled differently ("::ffff:1.2.3.4"),
		// so compare the decoded form rather than bytes.
		h2, err := ReadHeader(bytes.NewReader(out))
		if err != nil || h2 != h {
			t.Fatalf("re-decode = %+v, %v; want %+v", h2, err, h)
		}
	})
}

// FuzzReadDatagram checks the datagram framing decoder on arbitrary streams:
// no panic, lengths within the buffer, and it never reads past a frame.
func FuzzReadDatagram(f *testing.F) {
	f.Add([]byte{0, 0}, 16)
	f.Add([]byte{0, 3, 'a', 'b', 'c', 0, 1, 'd'}, 2)
	f.Add([]byte{0xff, 0xff, 1}, 65535)
	f.Fuzz(func(t *testing.T, in []byte, bufLen int) {
		if bufLen < 0 || bufLen > MaxDatagram {
			return
		}
		r := bytes.NewReader(in)
		buf := make([]byte, bufLen)
		for i := 0; i < 1000; i++ {
			before := r.Len()
			n, err := ReadDatagram(r, buf)
			if err != nil && !errors.Is(err, ErrDatagramTooLarge) {
				return
			}
			if n < 0 || n > bufLen {
				t.Fatalf("length %d outside buffer of %d", n, bufLen)
			}
			if before-r.Len() < DatagramHeaderLen {
				t.Fatalf("consumed %d bytes for a frame", before-r.Len())
			}
		}
	})
}

// FuzzStatus checks the status byte decoder.
func FuzzStatus(f *testing.F) {
	f.Add(byte(0))
	f.Add(byte(200))
	f.Fuzz(func(t *testing.T, b byte) {
		s, err := ParseStatusByte(b)
		if err == nil && (byte(s) != b || !s.Valid()) {
			t.Fatalf("ParseStatusByte(%d) = %v", b, s)
		}
	})
}
