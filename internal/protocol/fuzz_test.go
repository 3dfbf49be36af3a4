package protocol

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"testing"
)

// FuzzDecode checks the control decoder: no input makes it panic, errors
// wrap ErrBadMessage, the hand-written fast paths for data and credit
// messages accept only valid JSON and agree with encoding/json, and
// whatever is accepted survives an encode/decode round trip unchanged.
func FuzzDecode(f *testing.F) {
	for _, m := range []Message{
		validHello(),
		&HelloAck{Version: 1, Protocol: ProtocolYamux},
		&Register{Seq: 1, Services: []Service{{ID: "redis", Protocol: KindTCP, Port: 6379}}},
		&RegisterAck{Seq: 1, Endpoints: []Endpoint{{ID: "redis", Protocol: KindTCP, PublicPort: 16379}}},
		&Heartbeat{Seq: 1, TS: 2},
		&HeartbeatAck{Seq: 1 << 40, TS: -5},
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
	f.Add([]byte("{\"type\":\"tcp_data\",\"id\":1,\"data\":\"aGk\n=\"}"))
	f.Add([]byte(`{"type":"credit","id":4294967295,"bytes":1}`))
	f.Add([]byte(`{"type":"credit","id":1,"bytes":0}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		// The fast credit decoder must agree with encoding/json on
		// whatever it accepts.
		if id, n, ok := ParseCreditFast(b); ok {
			var c Credit
			if !json.Valid(b) {
				t.Fatalf("ParseCreditFast accepted invalid JSON %q", b)
			}
			if err := json.Unmarshal(b, &c); err != nil || c.ID != id || c.Bytes != n {
				t.Fatalf("ParseCreditFast(%q) = %d, %d; encoding/json: %+v, %v", b, id, n, c, err)
			}
		}
		// And the fast heartbeat decoder.
		if m, ok := parseHeartbeatFast(b); ok {
			if !json.Valid(b) {
				t.Fatalf("parseHeartbeatFast accepted invalid JSON %q", b)
			}
			var h struct {
				Type string `json:"type"`
				Heartbeat
			}
			err := json.Unmarshal(b, &h)
			var got Heartbeat
			switch m := m.(type) {
			case *Heartbeat:
				got = *m
				if h.Type != TypeHeartbeat {
					err = fmt.Errorf("type %q", h.Type)
				}
			case *HeartbeatAck:
				got = Heartbeat(*m)
				if h.Type != TypeHeartbeatAck {
					err = fmt.Errorf("type %q", h.Type)
				}
			}
			if err != nil || got != h.Heartbeat {
				t.Fatalf("parseHeartbeatFast(%q) = %+v; encoding/json: %+v, %v", b, got, h, err)
			}
		}
		// So must the fast data decoder, on every message whose payload
		// it decodes (the read loop refuses the others).
		if kind, id, enc, ok := ParseDataFast(b); ok {
			dst := make([]byte, len(enc))
			if n, err := DecodePayload(dst, enc); err == nil {
				if !json.Valid(b) {
					t.Fatalf("ParseDataFast accepted invalid JSON %q", b)
				}
				var d struct {
					Type string `json:"type"`
					ID   uint32 `json:"id"`
					Data []byte `json:"data"`
				}
				if err := json.Unmarshal(b, &d); err != nil || kindType(kind, TypeTCPData, TypeUDPData) != d.Type || id != d.ID || !bytes.Equal(dst[:n], d.Data) {
					t.Fatalf("ParseDataFast(%q) = %v, %d, %q; encoding/json: %+v, %v", b, kind, id, dst[:n], d, err)
				}
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
		m2, err := Decode(again)
		if err != nil {
			t.Fatalf("re-encoding of %q does not decode: %v", b, err)
		}
		if !sameMessage(m, m2) {
			t.Fatalf("%q decoded to %#v; its encoding %q decodes to %#v", b, m, again, m2)
		}
	})
}

// sameMessage compares two decoded messages. A data message's payload may
// be nil or empty when there is none: both mean no bytes.
func sameMessage(a, b Message) bool {
	if da, ok := a.(*Data); ok {
		db, ok := b.(*Data)
		return ok && da.Kind == db.Kind && da.ID == db.ID && bytes.Equal(da.Data, db.Data)
	}
	return reflect.DeepEqual(a, b)
}

// FuzzReadHeader checks the stream header decoder: no panic, and every
// accepted header re-encodes to the bytes it was read from.
func FuzzReadHeader(f *testing.F) {
	b, _ := AppendHeader(nil, StreamHeader{Kind: KindTCP, Service: "ns/gw/pg"})
	f.Add(b)
	f.Add([]byte{1, 2, 0, 1, 'x', 14, '1', '2', '7', '.', '0', '.', '0', '.', '1', ':', '8', '0', '8', '0'})
	f.Add([]byte{1, 1, 0xff, 0xff})
	b, _ = AppendHeader(nil, StreamHeader{Kind: KindUDP, Service: "dns", Client: netip.MustParseAddrPort("127.0.0.7:9"), Public: netip.MustParseAddrPort("[::1]:10053")})
	f.Add(b)
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

// FuzzReadDatagram checks the datagram framing decoder on arbitrary streams
// against a model of the framing: each call consumes exactly one frame (the
// 2-byte length and that many bytes) and returns its payload, or skips a
// frame too large for the buffer with ErrDatagramTooLarge; io.EOF comes only
// at a frame boundary, io.ErrUnexpectedEOF inside a frame.
func FuzzReadDatagram(f *testing.F) {
	f.Add([]byte{0, 0}, 16)
	f.Add([]byte{0, 3, 'a', 'b', 'c', 0, 1, 'd'}, 2)
	f.Add([]byte{0xff, 0xff, 1}, 65535)
	f.Add([]byte{0, 2, 'a'}, 1)
	f.Add([]byte{0, 1, 'a', 0}, 1)
	f.Add([]byte{0, 1}, 4)
	f.Fuzz(func(t *testing.T, in []byte, bufLen int) {
		if bufLen < 0 || bufLen > MaxDatagram {
			return
		}
		r := bytes.NewReader(in)
		buf := make([]byte, bufLen)
		for off := 0; ; {
			n, err := ReadDatagram(r, buf)
			rest := in[off:]
			consumed := len(rest) - r.Len()
			switch {
			case len(rest) == 0:
				if err != io.EOF {
					t.Fatalf("at the end of the stream: %d, %v; want io.EOF", n, err)
				}
				return
			case len(rest) < DatagramHeaderLen || len(rest) < DatagramHeaderLen+int(binary.BigEndian.Uint16(rest)):
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("stream ends inside a frame at %d: %d, %v; want io.ErrUnexpectedEOF", off, n, err)
				}
				return
			}
			size := int(binary.BigEndian.Uint16(rest))
			if consumed != DatagramHeaderLen+size {
				t.Fatalf("frame of %d bytes at %d: consumed %d bytes", size, off, consumed)
			}
			if size > bufLen {
				if !errors.Is(err, ErrDatagramTooLarge) || n != 0 {
					t.Fatalf("frame of %d bytes into %d: %d, %v; want ErrDatagramTooLarge", size, bufLen, n, err)
				}
			} else if err != nil || n != size || !bytes.Equal(buf[:n], rest[DatagramHeaderLen:DatagramHeaderLen+size]) {
				t.Fatalf("frame of %d bytes at %d: got %d bytes %q, %v", size, off, n, buf[:max(n, 0)], err)
			}
			off += consumed
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
