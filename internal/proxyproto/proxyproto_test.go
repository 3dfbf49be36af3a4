package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const sigHex = "0d0a0d0a000d0a515549540a"

func TestAppendV1(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		want     string
	}{
		// The specification's example.
		{"spec example", ap("192.168.0.1:56324"), ap("192.168.0.11:443"), "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"},
		{"ipv6", ap("[2001:db8::1]:40000"), ap("[::1]:8080"), "PROXY TCP6 2001:db8::1 ::1 40000 8080\r\n"},
		{"mapped client is ipv4", ap("[::ffff:127.0.0.7]:5000"), ap("127.0.0.1:80"), "PROXY TCP4 127.0.0.7 127.0.0.1 5000 80\r\n"},
		{"both mapped", ap("[::ffff:10.0.0.1]:1"), ap("[::ffff:10.0.0.2]:2"), "PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"},
		{"zone dropped", ap("[fe80::1%eth0]:1"), ap("[fe80::2]:2"), "PROXY TCP6 fe80::1 fe80::2 1 2\r\n"},
		{"ports 0 and 65535", ap("1.2.3.4:0"), ap("5.6.7.8:65535"), "PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n"},
		{"mixed families", ap("[2001:db8::1]:1"), ap("127.0.0.1:2"), "PROXY UNKNOWN\r\n"},
		{"mixed families reversed", ap("127.0.0.1:1"), ap("[::1]:2"), "PROXY UNKNOWN\r\n"},
		{"invalid source", netip.AddrPort{}, ap("127.0.0.1:2"), "PROXY UNKNOWN\r\n"},
		{"invalid destination", ap("127.0.0.1:2"), netip.AddrPort{}, "PROXY UNKNOWN\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(AppendV1([]byte("x"), tc.src, tc.dst))
			if got != "x"+tc.want {
				t.Fatalf("AppendV1 = %q, want %q", got, "x"+tc.want)
			}
		})
	}
	// The longest TCP6 line is the specification's 104 bytes.
	full := ap("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")
	if n := len(AppendV1(nil, full, full)); n != 104 {
		t.Errorf("longest TCP6 line is %d bytes, want 104", n)
	}
}

func TestAppendV2(t *testing.T) {
	for _, tc := range []struct {
		name     string
		tr       Transport
		src, dst netip.AddrPort
		want     string // hex after the signature
	}{
		// The bytes a real HAProxy sent for 172.19.0.1:42578 -> 172.19.0.3:80.
		{"tcp4", TransportStream, ap("172.19.0.1:42578"), ap("172.19.0.3:80"), "21 11 000c ac130001 ac130003 a652 0050"},
		{"udp4", TransportDatagram, ap("127.0.0.7:53"), ap("127.0.0.1:5353"), "21 12 000c 7f000007 7f000001 0035 14e9"},
		{"tcp6", TransportStream, ap("[2001:db8::7]:1"), ap("[::1]:2"),
			"21 21 0024 20010db8000000000000000000000007 00000000000000000000000000000001 0001 0002"},
		{"udp6", TransportDatagram, ap("[::1]:1"), ap("[::1]:2"),
			"21 22 0024 00000000000000000000000000000001 00000000000000000000000000000001 0001 0002"},
		{"mapped client is ipv4", TransportStream, ap("[::ffff:127.0.0.7]:1"), ap("127.0.0.1:2"), "21 11 000c 7f000007 7f000001 0001 0002"},
		{"mixed: ipv4 destination mapped into ipv6", TransportStream, ap("[::1]:1"), ap("127.0.0.1:2"),
			"21 21 0024 00000000000000000000000000000001 00000000000000000000ffff7f000001 0001 0002"},
		{"mixed: ipv4 source mapped into ipv6", TransportDatagram, ap("127.0.0.7:1"), ap("[::1]:2"),
			"21 22 0024 00000000000000000000ffff7f000007 00000000000000000000000000000001 0001 0002"},
		{"invalid address", TransportStream, netip.AddrPort{}, ap("127.0.0.1:2"), "21 00 0000"},
		{"unspec transport", TransportUnspec, ap("127.0.0.1:1"), ap("127.0.0.1:2"), "21 00 0000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := AppendV2([]byte{0xaa}, tc.tr, tc.src, tc.dst)
			want := append([]byte{0xaa}, unhex(t, sigHex+tc.want)...)
			if !bytes.Equal(got, want) {
				t.Fatalf("AppendV2 =\n% x\nwant\n% x", got, want)
			}
		})
	}
	if got, want := AppendV2Local(nil), unhex(t, sigHex+"20 00 0000"); !bytes.Equal(got, want) {
		t.Errorf("AppendV2Local = % x, want % x", got, want)
	}
}

// TestAppendAllocs checks that the encoders allocate nothing with a buffer
// of the documented size: they run once per connection and per datagram.
func TestAppendAllocs(t *testing.T) {
	buf := make([]byte, 0, MaxV2EncodedLen)
	src6, dst6 := ap("[2001:db8::1234:5678]:40000"), ap("[2001:db8::1]:443")
	src4, dst4 := ap("[::ffff:127.0.0.7]:40000"), ap("127.0.0.1:443")
	for name, f := range map[string]func(){
		"v1 tcp4":  func() { buf = AppendV1(buf[:0], src4, dst4) },
		"v1 tcp6":  func() { buf = AppendV1(buf[:0], src6, dst6) },
		"v2 tcp4":  func() { buf = AppendV2(buf[:0], TransportStream, src4, dst4) },
		"v2 udp6":  func() { buf = AppendV2(buf[:0], TransportDatagram, src6, dst6) },
		"v2 mixed": func() { buf = AppendV2(buf[:0], TransportStream, src6, dst4) },
		"v2 local": func() { buf = AppendV2Local(buf[:0]) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocations per call, want 0", name, n)
		}
	}
}

func TestParseValid(t *testing.T) {
	v2 := func(s string) string { return string(unhex(t, sigHex+s)) }
	for _, tc := range []struct {
		name, in string
		want     Header
	}{
		{"v1 spec example", "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
			Header{1, CommandProxy, TransportStream, ap("192.168.0.1:56324"), ap("192.168.0.11:443")}},
		{"v1 tcp6", "PROXY TCP6 2001:DB8::7 ::1 0 65535\r\n",
			Header{1, CommandProxy, TransportStream, ap("[2001:db8::7]:0"), ap("[::1]:65535")}},
		{"v1 tcp6 mapped", "PROXY TCP6 ::ffff:127.0.0.7 ::ffff:127.0.0.1 1 2\r\n",
			Header{1, CommandProxy, TransportStream, ap("127.0.0.7:1"), ap("127.0.0.1:2")}},
		// The shortest lines: Read's lower bound on the line length
		// must not exceed them.
		{"v1 shortest tcp4", "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
			Header{1, CommandProxy, TransportStream, ap("0.0.0.0:0"), ap("0.0.0.0:0")}},
		{"v1 shortest tcp6", "PROXY TCP6 :: :: 0 0\r\n",
			Header{1, CommandProxy, TransportStream, ap("[::]:0"), ap("[::]:0")}},
		{"v1 unknown short", "PROXY UNKNOWN\r\n", Header{Version: 1, Command: CommandProxy}},
		{"v1 unknown long", "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
			Header{Version: 1, Command: CommandProxy}},
		{"v1 unknown junk ignored", "PROXY UNKNOWN whatever \x01 here\r\n", Header{Version: 1, Command: CommandProxy}},
		{"v2 tcp4 from haproxy", v2("21 11 000c ac130001 ac130003 a652 0050"),
			Header{2, CommandProxy, TransportStream, ap("172.19.0.1:42578"), ap("172.19.0.3:80")}},
		{"v2 udp6", v2("21 22 0024 20010db8000000000000000000000007 00000000000000000000000000000001 0035 0036"),
			Header{2, CommandProxy, TransportDatagram, ap("[2001:db8::7]:53"), ap("[::1]:54")}},
		{"v2 inet6 mapped", v2("21 21 0024 00000000000000000000ffff7f000007 00000000000000000000ffff7f000001 0001 0002"),
			Header{2, CommandProxy, TransportStream, ap("127.0.0.7:1"), ap("127.0.0.1:2")}},
		{"v2 tcp4 with TLVs", v2("21 11 001c 7f000007 7f000001 0001 0002 01 0002 6832 04 0000 ea 0005 0176706365"),
			Header{2, CommandProxy, TransportStream, ap("127.0.0.7:1"), ap("127.0.0.1:2")}},
		{"v2 local", v2("20 00 0000"), Header{Version: 2, Command: CommandLocal}},
		{"v2 local with addresses ignored", v2("20 11 000c 7f000007 7f000001 0001 0002"), Header{Version: 2, Command: CommandLocal}},
		{"v2 unspec", v2("21 00 0000"), Header{Version: 2, Command: CommandProxy}},
		{"v2 unspec with bytes skipped", v2("21 00 0003 010203"), Header{Version: 2, Command: CommandProxy}},
		{"v2 inet unspec transport", v2("21 10 000c 7f000007 7f000001 0001 0002"), Header{Version: 2, Command: CommandProxy}},
		{"v2 unix", v2("21 31 00d8" + strings.Repeat("00", 216)), Header{Version: 2, Command: CommandProxy}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const trailer = "SSH-2.0-client\r\n\x00\r\n"
			h, n, err := Parse([]byte(tc.in + trailer))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if h != tc.want || n != len(tc.in) {
				t.Fatalf("Parse = %+v, %d; want %+v, %d", h, n, tc.want, len(tc.in))
			}

			// Read consumes exactly the header, from a reader that
			// hands out one byte at a time as well as from one that
			// has nothing after the header (a server-speaks-first
			// protocol: asking for more would block).
			for name, r := range map[string]io.Reader{
				"whole":    strings.NewReader(tc.in + trailer),
				"one byte": io.MultiReader(oneByteReader{strings.NewReader(tc.in + trailer)}),
				"no data":  strings.NewReader(tc.in),
			} {
				h, err := Read(r)
				if err != nil {
					t.Fatalf("Read (%s): %v", name, err)
				}
				if h != tc.want {
					t.Fatalf("Read (%s) = %+v, want %+v", name, h, tc.want)
				}
				rest, _ := io.ReadAll(r)
				if name != "no data" && string(rest) != trailer {
					t.Fatalf("Read (%s) left %q, want %q", name, rest, trailer)
				}
			}

			br := bufio.NewReader(strings.NewReader(tc.in + trailer))
			h, err = ReadBuffered(br)
			if err != nil || h != tc.want {
				t.Fatalf("ReadBuffered = %+v, %v; want %+v", h, err, tc.want)
			}
			if rest, _ := io.ReadAll(br); string(rest) != trailer {
				t.Fatalf("ReadBuffered left %q, want %q", rest, trailer)
			}
			h, err = ReadBuffered(bufio.NewReader(strings.NewReader(tc.in)))
			if err != nil || h != tc.want {
				t.Fatalf("ReadBuffered (no data) = %+v, %v; want %+v", h, err, tc.want)
			}
		})
	}
}

// oneByteReader returns at most one byte per Read.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.r.Read(p)
}

func TestParseInvalid(t *testing.T) {
	v2 := func(s string) string { return string(unhex(t, sigHex+s)) }
	for _, tc := range []struct {
		name, in string
		want     error  // sentinel
		msg      string // in the error text
	}{
		{"http", "GET / HTTP/1.1\r\n\r\n", ErrNoHeader, `"GET / HT"`},
		{"ssh", "SSH-2.0-OpenSSH_9.2\r\n", ErrNoHeader, "SSH"},
		{"proxy without space", "PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n", ErrNoHeader, "PROXYTCP"},
		{"v2 signature broken", "\r\n\r\n\x00\r\nQUIX\n!\x11\x00\x0c", ErrNoHeader, "QUIX"},
		{"v1 udp4", "PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", ErrInvalid, `protocol "UDP4"`},
		{"v1 lowercase", "PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", ErrInvalid, `protocol "tcp4"`},
		{"v1 LF only", "PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", ErrInvalid, "LF without CR"},
		{"v1 CR only", "PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rxx", ErrInvalid, "CR without LF"},
		{"v1 too long", "PROXY UNKNOWN " + strings.Repeat("f", 100) + "\r\n", ErrInvalid, "no CRLF in its first 107 bytes"},
		{"v1 double space", "PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", ErrInvalid, "empty field"},
		{"v1 missing port", "PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", ErrInvalid, "ends after 5 of 6 fields"},
		{"v1 extra field", "PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", ErrInvalid, "more than 6 fields"},
		{"v1 trailing space", "PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", ErrInvalid, "more than 6 fields"},
		{"v1 leading zero in port", "PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", ErrInvalid, `source port "01"`},
		{"v1 port too big", "PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", ErrInvalid, "destination port 65536 is out of range"},
		{"v1 leading zero in address", "PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", ErrInvalid, "source address"},
		{"v1 ipv6 in tcp4", "PROXY TCP4 ::1 1.2.3.4 1 2\r\n", ErrInvalid, `non-IPv4 source address "::1"`},
		{"v1 ipv4 in tcp6", "PROXY TCP6 ::1 1.2.3.4 1 2\r\n", ErrInvalid, `non-IPv6 destination address "1.2.3.4"`},
		{"v1 zone", "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", ErrInvalid, "unexpected byte '%'"},
		{"v1 empty port", "PROXY TCP4 1.2.3.4 1.2.3.4 1 \r\n", ErrInvalid, "empty field"},
		{"v1 garbage byte", "PROXY TCP4 1.2.3.4 1.2.3.4 1 x\r\n", ErrInvalid, "unexpected byte 'x'"},
		{"v2 version 1", v2("11 11 000c 7f000007 7f000001 0001 0002"), ErrInvalid, "version 1"},
		{"v2 command 2", v2("22 11 000c 7f000007 7f000001 0001 0002"), ErrInvalid, "command 0x2"},
		{"v2 family 4", v2("21 41 0000"), ErrInvalid, "address family 0x4"},
		{"v2 transport 3", v2("21 13 000c 7f000007 7f000001 0001 0002"), ErrInvalid, "transport protocol 0x3"},
		{"v2 inet short block", v2("21 11 000b 7f000007 7f000001 0001 00"), ErrInvalid, "11 bytes is shorter than the 12"},
		{"v2 inet6 short block", v2("21 21 000c 7f000007 7f000001 0001 0002"), ErrInvalid, "shorter than the 36"},
		{"v2 too long", v2("21 11 0401"), ErrInvalid, "1025 bytes exceeds the limit of 1024"},
		{"v2 TLV overrun", v2("21 11 0010 7f000007 7f000001 0001 0002 01 0005 68"), ErrInvalid, "claims 5 bytes, 1 left"},
		{"v2 TLV stray bytes", v2("21 11 000e 7f000007 7f000001 0001 0002 0100"), ErrInvalid, "2 stray bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for name, read := range map[string]func() error{
				"Parse": func() error { _, _, err := Parse([]byte(tc.in)); return err },
				"Read":  func() error { _, err := Read(strings.NewReader(tc.in)); return err },
				"ReadBuffered": func() error {
					_, err := ReadBuffered(bufio.NewReader(strings.NewReader(tc.in)))
					return err
				},
			} {
				err := read()
				if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
					t.Errorf("%s: error %v, want %v containing %q", name, err, tc.want, tc.msg)
				}
			}
		})
	}
}

// TestParseIncomplete checks that every proper prefix of a header is
// reported as incomplete (not as invalid), and that Read at the end of such
// input reports the early end.
func TestParseIncomplete(t *testing.T) {
	for _, hdr := range []string{
		"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
		"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
		"PROXY UNKNOWN\r\n",
		string(AppendV2(nil, TransportStream, ap("[::1]:1"), ap("[::1]:2"))),
	} {
		for i := 0; i < len(hdr); i++ {
			_, _, err := Parse([]byte(hdr[:i]))
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("Parse(%q) = %v, want io.ErrUnexpectedEOF", hdr[:i], err)
			}
			_, err = Read(strings.NewReader(hdr[:i]))
			if !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
				t.Fatalf("Read(%q) = %v, want an early end", hdr[:i], err)
			}
		}
	}
}

// TestReadFewReads checks that Read takes a version 1 line in a handful of
// reads (bounded by the shortest form of the fields still to come), not one
// read per byte.
func TestReadFewReads(t *testing.T) {
	for _, tc := range []struct {
		hdr      string
		maxReads int
	}{
		{"PROXY TCP4 127.0.0.7 127.0.0.1 40000 8080\r\n", 6},
		{"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 10},
		{string(AppendV2(nil, TransportStream, ap("[::1]:1"), ap("[::1]:2"))), 3},
	} {
		r := &countingReader{r: strings.NewReader(tc.hdr + "data")}
		if _, err := Read(r); err != nil {
			t.Fatal(err)
		}
		if r.reads > tc.maxReads {
			t.Errorf("%q: %d reads, want at most %d", tc.hdr, r.reads, tc.maxReads)
		}
	}
}

type countingReader struct {
	r     io.Reader
	reads int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

func TestReadBufferedSmallBuffer(t *testing.T) {
	_, err := ReadBuffered(bufio.NewReaderSize(strings.NewReader("PROXY UNKNOWN\r\n"), 64))
	if err == nil || !strings.Contains(err.Error(), "cannot hold") {
		t.Fatalf("ReadBuffered with a 64-byte buffer: %v", err)
	}
}

func TestParseDatagram(t *testing.T) {
	payload := []byte("\x12\x34 a DNS query")
	for _, tc := range []struct {
		name string
		hdr  []byte
		want Header
	}{
		{"udp4", AppendV2(nil, TransportDatagram, ap("127.0.0.7:5353"), ap("127.0.0.1:53")),
			Header{2, CommandProxy, TransportDatagram, ap("127.0.0.7:5353"), ap("127.0.0.1:53")}},
		{"udp6", AppendV2(nil, TransportDatagram, ap("[::1]:5353"), ap("[2001:db8::1]:53")),
			Header{2, CommandProxy, TransportDatagram, ap("[::1]:5353"), ap("[2001:db8::1]:53")}},
		{"local", AppendV2Local(nil), Header{Version: 2, Command: CommandLocal}},
		{"unspec", AppendV2(nil, TransportUnspec, netip.AddrPort{}, netip.AddrPort{}), Header{Version: 2, Command: CommandProxy}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, off, err := ParseDatagram(append(tc.hdr, payload...))
			if err != nil {
				t.Fatal(err)
			}
			if h != tc.want || off != len(tc.hdr) {
				t.Fatalf("ParseDatagram = %+v, %d; want %+v, %d", h, off, tc.want, len(tc.hdr))
			}
		})
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want error
		msg  string
	}{
		{"v1", []byte("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n"), ErrNoHeader, "version 2 signature"},
		{"no header", payload, ErrNoHeader, "version 2 signature"},
		{"stream", AppendV2(nil, TransportStream, ap("127.0.0.7:1"), ap("127.0.0.1:2")), ErrInvalid, "STREAM header on a datagram"},
		{"truncated", AppendV2(nil, TransportDatagram, ap("127.0.0.7:1"), ap("127.0.0.1:2"))[:20], ErrInvalid, "ends inside its header"},
		{"bad family", unhex(t, sigHex+"21 52 0000"), ErrInvalid, "address family 0x5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := ParseDatagram(tc.in)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("ParseDatagram: %v, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}

// TestHeaderAppendRoundTrip checks that Append re-encodes what the encoders
// wrote to the same header.
func TestHeaderAppendRoundTrip(t *testing.T) {
	for _, hdr := range [][]byte{
		AppendV1(nil, ap("127.0.0.7:1"), ap("127.0.0.1:2")),
		AppendV1(nil, ap("[::1]:1"), ap("[2001:db8::1]:2")),
		AppendV1(nil, ap("[::1]:1"), ap("127.0.0.1:2")),
		AppendV2(nil, TransportStream, ap("127.0.0.7:1"), ap("127.0.0.1:2")),
		AppendV2(nil, TransportDatagram, ap("[::1]:1"), ap("127.0.0.1:2")),
		AppendV2(nil, TransportStream, netip.AddrPort{}, netip.AddrPort{}),
		AppendV2Local(nil),
	} {
		h, n, err := Parse(hdr)
		if err != nil || n != len(hdr) {
			t.Fatalf("Parse(%q) = %v, %d", hdr, err, n)
		}
		if again := h.Append(nil); !bytes.Equal(again, hdr) {
			t.Errorf("Append(Parse(%q)) = %q", hdr, again)
		}
	}
}

func BenchmarkAppendV1(b *testing.B) {
	buf := make([]byte, 0, MaxV1Len)
	src, dst := ap("[::ffff:203.0.113.7]:40000"), ap("198.51.100.1:5432")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendV1(buf[:0], src, dst)
	}
}

func BenchmarkAppendV1IPv6(b *testing.B) {
	buf := make([]byte, 0, MaxV1Len)
	src, dst := ap("[2001:db8:85a3::8a2e:370:7334]:40000"), ap("[2001:db8::1]:5432")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendV1(buf[:0], src, dst)
	}
}

func BenchmarkAppendV2(b *testing.B) {
	buf := make([]byte, 0, MaxV2EncodedLen)
	src, dst := ap("[::ffff:203.0.113.7]:40000"), ap("198.51.100.1:5432")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendV2(buf[:0], TransportStream, src, dst)
	}
}

func BenchmarkAppendV2IPv6Datagram(b *testing.B) {
	buf := make([]byte, 0, MaxV2EncodedLen)
	src, dst := ap("[2001:db8:85a3::8a2e:370:7334]:40000"), ap("[2001:db8::1]:53")
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendV2(buf[:0], TransportDatagram, src, dst)
	}
}

func BenchmarkParseDatagram(b *testing.B) {
	d := AppendV2(nil, TransportDatagram, ap("203.0.113.7:40000"), ap("198.51.100.1:53"))
	d = append(d, "payload"...)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := ParseDatagram(d); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRead is the gateway's per-connection cost of taking a header off
// a conn (here a bytes.Reader holding the header and some client data).
func BenchmarkRead(b *testing.B) {
	for _, tc := range []struct {
		name string
		hdr  []byte
	}{
		{"v1", AppendV1(nil, ap("203.0.113.7:40000"), ap("198.51.100.1:5432"))},
		{"v2", AppendV2(nil, TransportStream, ap("203.0.113.7:40000"), ap("198.51.100.1:5432"))},
	} {
		in := append(tc.hdr, "client data"...)
		b.Run(tc.name, func(b *testing.B) {
			r := bytes.NewReader(in)
			b.ReportAllocs()
			for b.Loop() {
				r.Reset(in)
				if _, err := Read(r); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
