package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestHeaderRoundTrip(t *testing.T) {
	cases := []StreamHeader{
		{Kind: KindTCP, Service: "redis"},
		{Kind: KindUDP, Service: "kube-system/udp-gw/dns", Client: netip.MustParseAddrPort("203.0.113.7:53000")},
		{Kind: KindTCP, Service: strings.Repeat("a", MaxServiceIDLen), Client: netip.MustParseAddrPort("[2001:db8::1]:65535")},
		{Kind: KindTCP, Service: "pg", Client: netip.MustParseAddrPort("127.0.0.7:40000"), Public: netip.MustParseAddrPort("192.0.2.1:15432")},
		{Kind: KindUDP, Service: "dns", Public: netip.MustParseAddrPort("[2001:db8::2]:10053")},
		{Kind: KindTCP, Service: strings.Repeat("a", MaxServiceIDLen),
			Client: netip.MustParseAddrPort("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
			Public: netip.MustParseAddrPort("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")},
	}
	for _, h := range cases {
		b, err := AppendHeader(nil, h)
		if err != nil {
			t.Fatalf("AppendHeader(%+v): %v", h, err)
		}
		// Data after the header must stay unread.
		r := bytes.NewReader(append(b, "tail"...))
		got, err := ReadHeader(r)
		if err != nil {
			t.Fatalf("ReadHeader: %v", err)
		}
		if got != h {
			t.Fatalf("round trip: got %+v, want %+v", got, h)
		}
		rest, _ := io.ReadAll(r)
		if string(rest) != "tail" {
			t.Fatalf("ReadHeader consumed data after the header: rest %q", rest)
		}
	}
}

func TestHeaderRejects(t *testing.T) {
	good, _ := AppendHeader(nil, StreamHeader{Kind: KindTCP, Service: "pg", Client: netip.MustParseAddrPort("127.0.0.1:1")})
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string][]byte{
		"empty":        nil,
		"version":      mut(func(b []byte) []byte { b[0] = 9; return b }),
		"kind":         mut(func(b []byte) []byte { b[1] = 7; return b }),
		"zero id":      {1, 1, 0, 0, 0},
		"long id":      {1, 1, 0xff, 0xff},
		"bad id char":  {1, 1, 0, 2, 'a', ' ', 0},
		"truncated id": {1, 1, 0, 5, 'a'},
		"bad client":   {1, 1, 0, 1, 'a', 3, 'x', 'y', 'z'},
		"long client":  {1, 1, 0, 1, 'a', 200},
		"cut client":   good[:len(good)-2],
	}
	for name, b := range cases {
		if _, err := ReadHeader(bytes.NewReader(b)); !errors.Is(err, ErrBadHeader) {
			t.Errorf("%s: err = %v, want ErrBadHeader", name, err)
		}
	}
	if _, err := AppendHeader(nil, StreamHeader{Kind: KindTCP, Service: "a b"}); err == nil {
		t.Error("AppendHeader accepted an invalid service id")
	}
}

func TestStatus(t *testing.T) {
	for s := StatusOK; s <= StatusError; s++ {
		got, err := ParseStatusByte(byte(s))
		if err != nil || got != s {
			t.Fatalf("ParseStatusByte(%d) = %v, %v", s, got, err)
		}
		byName, err := ParseStatus(s.String())
		if err != nil || byName != s {
			t.Fatalf("ParseStatus(%q) = %v, %v", s.String(), byName, err)
		}
	}
	if _, err := ParseStatusByte(6); err == nil {
		t.Fatal("status byte 6 accepted")
	}
	if _, err := ParseStatus("maybe"); err == nil {
		t.Fatal("status name \"maybe\" accepted")
	}
}

func TestDatagramFraming(t *testing.T) {
	var stream bytes.Buffer
	sizes := []int{0, 1, 1400, 8192, 65000, MaxDatagram}
	for _, n := range sizes {
		frame := make([]byte, DatagramHeaderLen+n)
		for i := range frame[DatagramHeaderLen:] {
			frame[DatagramHeaderLen+i] = byte(i * 7)
		}
		if err := PutDatagramHeader(frame, n); err != nil {
			t.Fatal(err)
		}
		stream.Write(frame)
	}
	if err := PutDatagramHeader(make([]byte, 2), MaxDatagram+1); err == nil {
		t.Fatal("PutDatagramHeader accepted 65536 bytes")
	}
	buf := make([]byte, MaxDatagram)
	for _, n := range sizes {
		got, err := ReadDatagram(&stream, buf)
		if err != nil || got != n {
			t.Fatalf("ReadDatagram = %d, %v; want %d", got, err, n)
		}
		for i := 0; i < got; i++ {
			if buf[i] != byte(i*7) {
				t.Fatalf("datagram of %d bytes corrupted at %d", n, i)
			}
		}
	}
	if _, err := ReadDatagram(&stream, buf); err != io.EOF {
		t.Fatalf("at end: err = %v, want io.EOF", err)
	}
}

func TestDatagramTooLargeKeepsSync(t *testing.T) {
	var stream bytes.Buffer
	for _, p := range []string{"0123456789", "ok"} {
		f := make([]byte, 2+len(p))
		PutDatagramHeader(f, len(p))
		copy(f[2:], p)
		stream.Write(f)
	}
	buf := make([]byte, 4)
	if _, err := ReadDatagram(&stream, buf); !errors.Is(err, ErrDatagramTooLarge) {
		t.Fatalf("err = %v, want ErrDatagramTooLarge", err)
	}
	n, err := ReadDatagram(&stream, buf)
	if err != nil || string(buf[:n]) != "ok" {
		t.Fatalf("next datagram = %q, %v; want \"ok\"", buf[:n], err)
	}
	// A stream cut inside a datagram is not a clean EOF.
	if _, err := ReadDatagram(bytes.NewReader([]byte{0, 5, 'a'}), buf); err != io.ErrUnexpectedEOF {
		t.Fatalf("cut datagram: err = %v, want io.ErrUnexpectedEOF", err)
	}
}

func validHello() *Hello {
	return &Hello{Version: 1, Protocols: []string{"yamux", "json"}, HeartbeatIntervalMS: 5000,
		MaxMessageSize: 1 << 20, MaxServices: 100, StreamWindow: 256 << 10, Agent: "prod", PublicHost: "gw.example.com"}
}

func TestControlRoundTrip(t *testing.T) {
	msgs := []Message{
		validHello(),
		&HelloAck{Version: 1, Protocol: ProtocolJSON, Client: "portway dev"},
		&Register{Seq: 3, Services: []Service{
			{ID: "redis", Protocol: KindTCP, Port: 6379},
			{ID: "ns/gw/dns", Protocol: KindUDP, Port: 53, MaxDatagram: 1500, IdleTimeoutMS: 300000, Mode: "dual"},
			{ID: "redis", Protocol: KindUDP, Port: 6379, PublicPort: 16000},
		}},
		&Register{Seq: 4, Services: []Service{}},
		&RegisterAck{Seq: 3, Endpoints: []Endpoint{{ID: "redis", Protocol: KindTCP, PublicPort: 16379, Address: "gw:16379"}, {ID: "x", Protocol: KindTCP, Error: "no port"}}},
		&Heartbeat{Seq: 9, TS: 123456789},
		&HeartbeatAck{Seq: 9, TS: 123456789},
		&Error{Code: "replaced", Message: "a newer session took over"},
		&Open{Kind: KindTCP, ID: 1, Service: "redis", Client: "127.0.0.1:4000"},
		&Open{Kind: KindUDP, ID: 2, Service: "dns"},
		&OpenResult{Kind: KindTCP, ID: 1, Status: StatusOK},
		&OpenResult{Kind: KindUDP, ID: 2, Status: StatusOverLimit},
		&Data{Kind: KindTCP, ID: 1, Data: []byte("hello\x00\xff")},
		&Data{Kind: KindUDP, ID: 4294967295, Data: []byte{}},
		&Close{Kind: KindTCP, ID: 1, Half: true},
		&Close{Kind: KindUDP, ID: 2},
		&Credit{ID: 1, Bytes: 65536},
	}
	for _, m := range msgs {
		b, err := Encode(m)
		if err != nil {
			t.Fatalf("Encode(%T): %v", m, err)
		}
		if !bytes.HasPrefix(b, []byte(`{"type":"`+m.Type()+`"`)) {
			t.Fatalf("Encode(%T) = %s: type not first", m, b)
		}
		if !json.Valid(b) {
			t.Fatalf("Encode(%T) = %s: invalid JSON", m, b)
		}
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("Decode(%s): %v", b, err)
		}
		if d, ok := m.(*Data); ok && len(d.Data) == 0 {
			// nil and empty payloads are the same on the wire
			if gd := got.(*Data); len(gd.Data) != 0 || gd.ID != d.ID || gd.Kind != d.Kind {
				t.Fatalf("Decode(%s) = %+v", b, got)
			}
			continue
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("round trip of %T:\n got %+v\nwant %+v", m, got, m)
		}
	}
}

func TestDecodeOtherSpellings(t *testing.T) {
	// Field order and whitespace other than ours go through encoding/json.
	m, err := Decode([]byte(` { "data" : "aGk=", "id": 7, "type": "udp_data" } `))
	if err != nil {
		t.Fatal(err)
	}
	if d := m.(*Data); d.Kind != KindUDP || d.ID != 7 || string(d.Data) != "hi" {
		t.Fatalf("got %+v", d)
	}
}

func TestDecodeRejects(t *testing.T) {
	deep := strings.Repeat(`{"a":`, 20000) + "1" + strings.Repeat("}", 20000)
	cases := map[string]string{
		"not json":           `hello`,
		"array":              `[1,2]`,
		"no type":            `{"id":1}`,
		"unknown type":       `{"type":"launch_missiles"}`,
		"wrong field type":   `{"type":"heartbeat","seq":"x"}`,
		"bad ack protocol":   `{"type":"gateway_hello_ack","protocol":"smux"}`,
		"hello no protocols": `{"type":"gateway_hello","version":1,"protocols":[],"heartbeat_interval_ms":5000,"max_message_size":1048576,"max_services":10,"stream_window":262144}`,
		"hello tiny window":  `{"type":"gateway_hello","version":1,"protocols":["json"],"heartbeat_interval_ms":5000,"max_message_size":1048576,"max_services":10,"stream_window":1024}`,
		"hello heartbeat 0":  `{"type":"gateway_hello","version":1,"protocols":["json"],"heartbeat_interval_ms":0,"max_message_size":1048576,"max_services":10,"stream_window":262144}`,
		// 2^58+1000 ms: as a time.Duration it wraps to exactly 1 s.
		"hello heartbeat wraps": `{"type":"gateway_hello","version":1,"protocols":["json"],"heartbeat_interval_ms":288230376151712744,"max_message_size":1048576,"max_services":10,"stream_window":262144}`,
		"register idle wraps":   `{"type":"register","services":[{"id":"a","protocol":"tcp","port":1,"idle_timeout_ms":288230376151712744}]}`,
		"register bad port":     `{"type":"register","services":[{"id":"a","protocol":"tcp","port":70000}]}`,
		"register bad id":       `{"type":"register","services":[{"id":"a b","protocol":"tcp","port":1}]}`,
		"register proto":        `{"type":"register","services":[{"id":"a","protocol":"sctp","port":1}]}`,
		"register dup":          `{"type":"register","services":[{"id":"a","protocol":"tcp","port":1},{"id":"a","protocol":"tcp","port":2}]}`,
		"register mode":         `{"type":"register","services":[{"id":"a","protocol":"tcp","port":1,"mode":"direct"}]}`,
		"register no proto":     `{"type":"register","services":[{"id":"a","port":1}]}`,
		"register null proto":   `{"type":"register","services":[{"id":"a","protocol":null,"port":1}]}`,
		"register proto number": `{"type":"register","services":[{"id":"a","protocol":1,"port":1}]}`,
		"register proto case":   `{"type":"register","services":[{"id":"a","protocol":"TCP","port":1}]}`,
		"ack proto":             `{"type":"register_ack","endpoints":[{"id":"a","protocol":"sctp"}]}`,
		"ack no proto":          `{"type":"register_ack","endpoints":[{"id":"a","error":"x"}]}`,
		"open id 0":             `{"type":"tcp_open","id":0,"service":"a"}`,
		"open bad client":       `{"type":"tcp_open","id":1,"service":"a","client":"nowhere"}`,
		"data bad base64":       `{"type":"tcp_data","id":1,"data":"***"}`,
		"data raw newline":      "{\"type\":\"tcp_data\",\"id\":1,\"data\":\"aGk\n=\"}",
		"data raw CRLF":         "{\"type\":\"udp_data\",\"id\":1,\"data\":\"aGk=\r\n\r\n\"}",
		"data id 0":             `{"type":"tcp_data","id":0,"data":""}`,
		"credit 0":              `{"type":"credit","id":1,"bytes":0}`,
		"status unknown":        `{"type":"tcp_open_result","id":1,"status":"perhaps"}`,
		"deep nesting":          `{"type":"heartbeat","x":` + deep + `}`,
	}
	for name, in := range cases {
		if _, err := Decode([]byte(in)); !errors.Is(err, ErrBadMessage) {
			t.Errorf("%s: err = %v, want ErrBadMessage", name, err)
		}
	}
}

func TestMaxDataPayloadFits(t *testing.T) {
	for _, max := range []int{MinMessageSize, 1 << 20} {
		p := MaxDataPayload(max)
		b := AppendData(nil, KindTCP, 4294967295, make([]byte, p))
		if len(b) > max {
			t.Fatalf("MaxDataPayload(%d) = %d gives a %d-byte message", max, p, len(b))
		}
	}
}

func BenchmarkAppendData(b *testing.B) {
	payload := make([]byte, 32<<10)
	buf := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendData(buf[:0], KindTCP, 12345, payload)
	}
}

func BenchmarkParseDataFast(b *testing.B) {
	msg := AppendData(nil, KindTCP, 12345, make([]byte, 32<<10))
	out := make([]byte, 32<<10)
	b.SetBytes(32 << 10)
	b.ReportAllocs()
	for b.Loop() {
		_, _, enc, ok := ParseDataFast(msg)
		if !ok {
			b.Fatal("not recognised")
		}
		if _, err := DecodePayload(out, enc); err != nil {
			b.Fatal(err)
		}
	}
}

func TestCreditFastPath(t *testing.T) {
	for _, c := range []Credit{{ID: 1, Bytes: 1}, {ID: 42, Bytes: 65536}, {ID: 4294967295, Bytes: 4294967295}} {
		b := AppendCredit(nil, c.ID, c.Bytes)
		if len(b) > CreditLen {
			t.Errorf("%q is longer than CreditLen %d", b, CreditLen)
		}
		slow, err := Encode(&c)
		if err != nil {
			t.Fatal(err)
		}
		var viaJSON Credit
		if err := json.Unmarshal(b, &viaJSON); err != nil || viaJSON != c {
			t.Errorf("AppendCredit wrote %q; encoding/json reads it as %+v, %v", b, viaJSON, err)
		}
		if !bytes.Equal(slow, b) {
			t.Errorf("Encode wrote %q, AppendCredit %q", slow, b)
		}
		id, n, ok := ParseCreditFast(b)
		if !ok || id != c.ID || n != c.Bytes {
			t.Errorf("ParseCreditFast(%q) = %d, %d, %v", b, id, n, ok)
		}
		if m, err := Decode(b); err != nil || *m.(*Credit) != c {
			t.Errorf("Decode(%q) = %+v, %v", b, m, err)
		}
	}
	for _, in := range []string{
		`{"type":"credit","id":0,"bytes":1}`,          // id 0: invalid
		`{"type":"credit","id":1,"bytes":0}`,          // no credit: invalid
		`{"type":"credit","id":01,"bytes":1}`,         // not JSON
		`{"type":"credit","id":4294967296,"bytes":1}`, // overflows
		`{"type":"credit","id":1,"bytes":1} `,         // other spelling: left to encoding/json
		`{"type":"credit","id":1, "bytes":1}`,
		`{"type":"credit","id":1,"bytes":1,"x":2}`,
		`{"type":"credit","id":-1,"bytes":1}`,
		`{"type":"credit","id":1,"bytes":}`,
	} {
		if id, n, ok := ParseCreditFast([]byte(in)); ok {
			t.Errorf("ParseCreditFast(%s) = %d, %d: accepted", in, id, n)
		}
	}
	// Other spellings of a valid credit still decode, through encoding/json.
	if m, err := Decode([]byte(`{"bytes":5, "type":"credit","id":3}`)); err != nil || *m.(*Credit) != (Credit{ID: 3, Bytes: 5}) {
		t.Errorf("Decode of another spelling = %+v, %v", m, err)
	}
}

func TestAppendCreditAllocatesNothing(t *testing.T) {
	buf := make([]byte, 0, CreditLen)
	if a := testing.AllocsPerRun(100, func() {
		buf = AppendCredit(buf[:0], 7, 65536)
		if _, _, ok := ParseCreditFast(buf); !ok {
			t.Fatal("not parsed")
		}
	}); a != 0 {
		t.Errorf("%.1f allocations per credit, want 0", a)
	}
}

// A Kind is "tcp" or "udp" in JSON, exactly the strings the register
// message has always carried, and nothing else is accepted either way.
func TestKindText(t *testing.T) {
	b, err := Encode(&Register{Seq: 1, Services: []Service{
		{ID: "a", Protocol: KindTCP, Port: 1, Mode: ModeTunnel},
		{ID: "b", Protocol: KindUDP, Port: 2},
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"type":"register","seq":1,"services":[{"id":"a","protocol":"tcp","port":1,"mode":"tunnel"},{"id":"b","protocol":"udp","port":2}]}`
	if string(b) != want {
		t.Fatalf("register encodes as\n %s\nwant\n %s", b, want)
	}
	for _, k := range []Kind{KindTCP, KindUDP} {
		var back Kind
		txt, err := k.MarshalText()
		if err != nil || back.UnmarshalText(txt) != nil || back != k {
			t.Errorf("%v: MarshalText = %q, %v; read back as %v", k, txt, err, back)
		}
	}
	for _, k := range []Kind{0, 3, 255} {
		if txt, err := k.MarshalText(); err == nil {
			t.Errorf("Kind(%d).MarshalText = %q, want an error", uint8(k), txt)
		}
	}
	for _, in := range []string{"", "TCP", "sctp", "tcp ", "1"} {
		k := KindUDP
		err := k.UnmarshalText([]byte(in))
		if err == nil || k != KindUDP {
			t.Errorf("UnmarshalText(%q) = %v, kind %v: want an error and the kind untouched", in, err, k)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, fmt.Sprintf("%q", in)) || !strings.Contains(msg, "want tcp or udp") {
			t.Errorf("UnmarshalText(%q) error %q does not name the value and the choices", in, msg)
		}
	}
	// The message names the service and the value when it comes from a
	// register message.
	_, err = Decode([]byte(`{"type":"register","services":[{"id":"a","protocol":"sctp","port":1}]}`))
	if err == nil || !strings.Contains(err.Error(), `"sctp"`) {
		t.Errorf("register with protocol sctp: err = %v, want one naming the value", err)
	}
	_, err = Decode([]byte(`{"type":"register","services":[{"id":"a","port":1}]}`))
	if err == nil || !strings.Contains(err.Error(), `service "a"`) || !strings.Contains(err.Error(), "missing protocol") {
		t.Errorf("register without protocol: err = %v, want one naming the service and the missing field", err)
	}
}
