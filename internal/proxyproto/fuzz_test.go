package proxyproto

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"
)

// fuzzSeeds are headers of every kind, some followed by client data.
func fuzzSeeds() [][]byte {
	a4, b4 := ap("127.0.0.7:40000"), ap("127.0.0.1:5432")
	a6, b6 := ap("[2001:db8::7]:40000"), ap("[::1]:5432")
	seeds := [][]byte{
		[]byte("PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n\r\n"),
		[]byte("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"),
		[]byte("PROXY UNKNOWN\r\nSSH-2.0-x\r\n"),
		[]byte("PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"),
		[]byte("PROXY TCP6 ::ffff:127.0.0.7 ::1 1 2\r\n"),
		[]byte("PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"),
		[]byte("PROXY TCP6 :: :: 0 0\r\n"),
		[]byte("PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n"),
		[]byte("GET / HTTP/1.1\r\n"),
		AppendV1(nil, a4, b4),
		AppendV1(nil, a6, b6),
		AppendV2(nil, TransportStream, a4, b4),
		AppendV2(nil, TransportStream, a6, b4),
		AppendV2(nil, TransportDatagram, a6, b6),
		AppendV2(nil, TransportUnspec, a4, b4),
		AppendV2Local(nil),
		append(AppendV2(nil, TransportStream, a4, b4), "\x00\x00\x00\x08\x04\xd2\x16\x2f"...),
	}
	// With TLVs (ALPN, NOOP padding, a vendor TLV).
	tlv := AppendV2(nil, TransportStream, a4, b4)
	tlv[15] += 16
	tlv = append(tlv, "\x01\x00\x02h2\x04\x00\x00\xea\x00\x05\x01vpce"...)
	return append(seeds, tlv)
}

// FuzzParse checks the parser on untrusted input: it never panics; Parse,
// Read and ReadBuffered agree; Read and ReadBuffered consume exactly the
// header and nothing after it; accepted headers are within the size limits;
// and what is accepted re-encodes (Header.Append) to a header that parses
// back to the same thing. The one specified exception: a version 1 TCP6
// line whose addresses unmap to different families (::ffff:a.b.c.d and a
// real IPv6 address) re-encodes as UNKNOWN, since version 1 cannot carry
// mixed families.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h, n, err := Parse(data)

		r := bytes.NewReader(data)
		rh, rerr := Read(r)
		br := bufio.NewReader(bytes.NewReader(data))
		bh, berr := ReadBuffered(br)

		if err != nil {
			if rerr == nil || berr == nil {
				t.Fatalf("Parse rejected %q (%v) but Read gave %+v, %v and ReadBuffered %+v, %v", data, err, rh, rerr, bh, berr)
			}
			if errors.Is(err, io.ErrUnexpectedEOF) != (errors.Is(rerr, io.ErrUnexpectedEOF) || errors.Is(rerr, io.EOF)) {
				t.Fatalf("Parse(%q): %v, but Read: %v", data, err, rerr)
			}
			return
		}
		if rerr != nil || berr != nil {
			t.Fatalf("Parse accepted %q but Read: %v, ReadBuffered: %v", data, rerr, berr)
		}
		if rh != h || bh != h {
			t.Fatalf("headers differ: Parse %+v, Read %+v, ReadBuffered %+v", h, rh, bh)
		}
		if got := len(data) - r.Len(); got != n {
			t.Fatalf("Read consumed %d bytes of %q, header is %d", got, data, n)
		}
		if rest, _ := io.ReadAll(br); !bytes.Equal(rest, data[n:]) {
			t.Fatalf("ReadBuffered left %q, want %q", rest, data[n:])
		}
		switch h.Version {
		case 1:
			if n > MaxV1Len {
				t.Fatalf("v1 header of %d bytes accepted", n)
			}
		case 2:
			if n > MaxV2Len {
				t.Fatalf("v2 header of %d bytes accepted", n)
			}
		default:
			t.Fatalf("version %d", h.Version)
		}
		if h.Source.IsValid() != h.Destination.IsValid() || h.HasAddrs() != (h.Transport != TransportUnspec) {
			t.Fatalf("inconsistent header %+v", h)
		}
		if h.HasAddrs() && (h.Source.Addr().Is4In6() || h.Destination.Addr().Is4In6() || h.Source.Addr().Zone() != "") {
			t.Fatalf("addresses not normalised: %+v", h)
		}

		enc := h.Append(nil)
		h2, n2, err := Parse(enc)
		if err != nil || n2 != len(enc) {
			t.Fatalf("re-encoded %+v as %q: Parse: %v, %d", h, enc, err, n2)
		}
		want := h
		if h.Version == 1 && h.HasAddrs() && h.Source.Addr().Is4() != h.Destination.Addr().Is4() {
			want = Header{Version: 1, Command: CommandProxy}
		}
		if h2 != want {
			t.Fatalf("%q parsed as %+v, re-encoded %q parsed as %+v", data[:n], h, enc, h2)
		}
	})
}

// FuzzParseDatagram checks the datagram form: it never panics, the payload
// offset is within the datagram, and an accepted header re-encodes to one
// that parses back to the same header.
func FuzzParseDatagram(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Add(append(AppendV2(nil, TransportDatagram, ap("127.0.0.7:5353"), ap("127.0.0.1:53")), "\x12\x34query"...))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, off, err := ParseDatagram(data)
		if err != nil {
			return
		}
		if off < v2FixedLen || off > len(data) || off > MaxV2Len {
			t.Fatalf("payload offset %d for a %d-byte datagram", off, len(data))
		}
		if h.Version != 2 || h.Transport == TransportStream {
			t.Fatalf("datagram header %+v", h)
		}
		if ph, pn, err := Parse(data); err != nil || ph != h || pn != off {
			t.Fatalf("Parse disagrees: %+v, %d, %v; ParseDatagram %+v, %d", ph, pn, err, h, off)
		}
		enc := append(h.Append(nil), data[off:]...)
		h2, off2, err := ParseDatagram(enc)
		if err != nil || h2 != h || !bytes.Equal(enc[off2:], data[off:]) {
			t.Fatalf("re-encoded %+v as %q: %+v, %d, %v", h, enc, h2, off2, err)
		}
	})
}
