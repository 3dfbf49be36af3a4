package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// HeaderVersion is the version byte that starts every stream header.
const HeaderVersion = 1

// HeaderVersionPublic starts a stream header that also carries the public
// endpoint the client connected to (StreamHeader.Public). The gateway sends
// it only for services registered with a proxy_protocol, which only agents
// that read it register, so older agents never receive it.
const HeaderVersionPublic = 2

// Kind says what a stream carries.
type Kind uint8

// Stream kinds.
const (
	KindTCP Kind = 1 // a byte stream with half-close
	KindUDP Kind = 2 // length-prefixed datagrams of one UDP session
)

// String returns "tcp" or "udp".
func (k Kind) String() string {
	switch k {
	case KindTCP:
		return "tcp"
	case KindUDP:
		return "udp"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Valid reports whether k is KindTCP or KindUDP.
func (k Kind) Valid() bool { return k == KindTCP || k == KindUDP }

// MarshalText implements encoding.TextMarshaler: JSON carries a Kind as
// "tcp" or "udp", the form the register message and the state file have
// always used. Any other Kind is an error, never an empty string.
func (k Kind) MarshalText() ([]byte, error) {
	if !k.Valid() {
		return nil, fmt.Errorf("protocol: invalid kind %d", uint8(k))
	}
	return []byte(k.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler: it accepts exactly
// "tcp" and "udp" and rejects anything else with ParseKind's error.
func (k *Kind) UnmarshalText(b []byte) error {
	v, err := ParseKind(string(b))
	if err != nil {
		return err
	}
	*k = v
	return nil
}

// ParseKind maps "tcp"/"udp" to a Kind.
func ParseKind(s string) (Kind, error) {
	switch s {
	case "tcp":
		return KindTCP, nil
	case "udp":
		return KindUDP, nil
	}
	return 0, fmt.Errorf("protocol: invalid protocol %q (want tcp or udp)", s)
}

// Limits on identifiers carried on the wire.
const (
	MaxServiceIDLen = 512 // namespace/gateway/listener fits comfortably
	maxClientLen    = 64  // "[ipv6%zone]:port"
	// MaxHeaderLen bounds a stream header: version, kind, 2-byte id length,
	// id, 1-byte client length, client, and in HeaderVersionPublic 1-byte
	// public length, public.
	MaxHeaderLen = 2 + 2 + MaxServiceIDLen + 1 + maxClientLen + 1 + maxClientLen
)

// StreamHeader starts every stream the gateway opens. It names a service id
// (never an address: the agent dials only backends it registered itself) and
// the public client's address, for logs and metrics.
type StreamHeader struct {
	Kind    Kind
	Service string
	Client  netip.AddrPort // zero when unknown
	// Public is the public endpoint (address and port) the client
	// connected to, the destination of a PROXY protocol header. Zero when
	// unknown; a header carrying it is encoded as HeaderVersionPublic.
	Public netip.AddrPort
}

// ErrBadHeader wraps every stream header decoding failure.
var ErrBadHeader = errors.New("protocol: bad stream header")

// ValidateServiceID reports whether id is acceptable as a service id:
// 1..MaxServiceIDLen bytes of letters, digits and . _ - / :
func ValidateServiceID(id string) error {
	if len(id) == 0 {
		return errors.New("service id is empty")
	}
	if len(id) > MaxServiceIDLen {
		return fmt.Errorf("service id is %d bytes, more than %d", len(id), MaxServiceIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '.', c == '_', c == '-', c == '/', c == ':':
		default:
			return fmt.Errorf("service id %q has invalid character %q at %d", truncate(id, 64), c, i)
		}
	}
	return nil
}

// AppendHeader appends the encoding of h to dst.
func AppendHeader(dst []byte, h StreamHeader) ([]byte, error) {
	if !h.Kind.Valid() {
		return dst, fmt.Errorf("protocol: encode header: invalid kind %d", h.Kind)
	}
	if err := ValidateServiceID(h.Service); err != nil {
		return dst, fmt.Errorf("protocol: encode header: %w", err)
	}
	var client string
	if h.Client.IsValid() {
		client = h.Client.String()
	}
	version := byte(HeaderVersion)
	if h.Public.IsValid() {
		version = HeaderVersionPublic
	}
	dst = append(dst, version, byte(h.Kind))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(h.Service)))
	dst = append(dst, h.Service...)
	dst = append(dst, byte(len(client)))
	dst = append(dst, client...)
	if version == HeaderVersionPublic {
		public := h.Public.String()
		dst = append(dst, byte(len(public)))
		dst = append(dst, public...)
	}
	return dst, nil
}

// ReadHeader reads and validates one stream header from r. It reads exactly
// the header's bytes, so data that follows stays in r.
func ReadHeader(r io.Reader) (StreamHeader, error) {
	var buf [MaxHeaderLen]byte
	if _, err := io.ReadFull(r, buf[:4]); err != nil {
		return StreamHeader{}, fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	if buf[0] != HeaderVersion && buf[0] != HeaderVersionPublic {
		return StreamHeader{}, fmt.Errorf("%w: version %d, want %d or %d", ErrBadHeader, buf[0], HeaderVersion, HeaderVersionPublic)
	}
	h := StreamHeader{Kind: Kind(buf[1])}
	if !h.Kind.Valid() {
		return StreamHeader{}, fmt.Errorf("%w: unknown kind %d", ErrBadHeader, buf[1])
	}
	idLen := int(binary.BigEndian.Uint16(buf[2:4]))
	if idLen == 0 || idLen > MaxServiceIDLen {
		return StreamHeader{}, fmt.Errorf("%w: service id length %d", ErrBadHeader, idLen)
	}
	// Read the id and the client length byte in one go.
	if _, err := io.ReadFull(r, buf[4:4+idLen+1]); err != nil {
		return StreamHeader{}, fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	h.Service = string(buf[4 : 4+idLen])
	if err := ValidateServiceID(h.Service); err != nil {
		return StreamHeader{}, fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	off := 4 + idLen
	ap, n, err := readAddr(r, buf[off:], buf[0] == HeaderVersionPublic, "client")
	if err != nil {
		return StreamHeader{}, err
	}
	h.Client = ap
	if buf[0] == HeaderVersionPublic {
		off += 1 + n
		if h.Public, _, err = readAddr(r, buf[off:], false, "public"); err != nil {
			return StreamHeader{}, err
		}
		if !h.Public.IsValid() {
			return StreamHeader{}, fmt.Errorf("%w: version %d without a public address", ErrBadHeader, HeaderVersionPublic)
		}
	}
	return h, nil
}

// readAddr decodes one length-prefixed address whose length byte is
// already in b[0]; with more set it also reads the next length byte, into
// b[1+length]. b has room for both (MaxHeaderLen). It returns the address
// and its encoded length.
func readAddr(r io.Reader, b []byte, more bool, what string) (netip.AddrPort, int, error) {
	n := int(b[0])
	if n > maxClientLen {
		return netip.AddrPort{}, 0, fmt.Errorf("%w: %s address length %d", ErrBadHeader, what, n)
	}
	want := n
	if more {
		want++
	}
	if want == 0 {
		return netip.AddrPort{}, 0, nil
	}
	if _, err := io.ReadFull(r, b[1:1+want]); err != nil {
		return netip.AddrPort{}, 0, fmt.Errorf("%w: %w", ErrBadHeader, err)
	}
	if n == 0 {
		return netip.AddrPort{}, 0, nil
	}
	ap, err := netip.ParseAddrPort(string(b[1 : 1+n]))
	if err != nil {
		return netip.AddrPort{}, 0, fmt.Errorf("%w: %s address: %w", ErrBadHeader, what, err)
	}
	return ap, n, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
