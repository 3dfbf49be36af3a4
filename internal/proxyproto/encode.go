// Package proxyproto implements the PROXY protocol (HAProxy's specification,
// version 1 text and version 2 binary) that carries a proxied connection's
// original source and destination addresses to the next hop.
//
// Encoding: AppendV1 and AppendV2 write a header for a TCP connection (and
// AppendV2 with TransportDatagram the header that starts each UDP datagram)
// into a caller-supplied buffer; they allocate nothing when the buffer has
// room (MaxV1Len or MaxV2EncodedLen bytes).
//
// Parsing reads untrusted input: Read takes exactly one header of either
// version from an io.Reader (typically a net.Conn) and never consumes a byte
// past it, ReadBuffered does the same from a bufio.Reader, Parse works on a
// byte slice and ParseDatagram on a datagram that starts with a version 2
// header. Headers are bounded (MaxV1Len, MaxV2Len); read deadlines are the
// caller's business (set one on the conn before calling Read).
//
// Address normalisation, the same in both directions: an IPv4-mapped IPv6
// address (::ffff:a.b.c.d) is treated as the IPv4 address a.b.c.d, and IPv6
// zones are dropped (they mean nothing to the peer).
//
// The package has no mutable state and no locks.
package proxyproto

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// Command is the version 2 command: whether the header carries a relayed
// connection's addresses (CommandProxy) or the connection was made by the
// proxy itself, e.g. a health check (CommandLocal).
type Command uint8

const (
	// CommandLocal marks a connection made by the proxy itself; the
	// receiver uses the real connection endpoints. Version 2 only.
	CommandLocal Command = 0x0
	// CommandProxy marks a relayed connection; the header holds its
	// original endpoints (or none, for v1 UNKNOWN and v2 AF_UNSPEC).
	CommandProxy Command = 0x1
)

// Transport is the transport protocol of the proxied connection.
type Transport uint8

const (
	// TransportUnspec is an unknown or unsupported transport (v1 UNKNOWN,
	// v2 UNSPEC); the header carries no usable address.
	TransportUnspec Transport = 0x0
	// TransportStream is TCP (v1 TCP4/TCP6, v2 STREAM).
	TransportStream Transport = 0x1
	// TransportDatagram is UDP (v2 DGRAM; version 1 cannot express it).
	TransportDatagram Transport = 0x2
)

// Header is one decoded PROXY protocol header.
type Header struct {
	// Version is 1 (text) or 2 (binary).
	Version int
	// Command is CommandProxy, or CommandLocal (version 2 only).
	Command Command
	// Transport is TransportStream or TransportDatagram when the header
	// carries addresses, TransportUnspec otherwise.
	Transport Transport
	// Source and Destination are the original connection's endpoints,
	// IPv4-mapped IPv6 addresses unmapped. Both are the zero AddrPort
	// (not IsValid) for a LOCAL command, v1 UNKNOWN, a v2 AF_UNSPEC or
	// AF_UNIX family or an UNSPEC transport: the receiver then uses the
	// real connection's addresses, as the specification says.
	Source, Destination netip.AddrPort
}

// HasAddrs reports whether h carries the original connection's addresses.
func (h Header) HasAddrs() bool { return h.Source.IsValid() && h.Destination.IsValid() }

// Append appends h encoded in its own version to b: AppendV1 for version 1;
// otherwise version 2, AppendV2Local for a LOCAL command and AppendV2 for
// PROXY.
func (h Header) Append(b []byte) []byte {
	if h.Version == 1 {
		if !h.HasAddrs() {
			return append(b, v1Unknown...)
		}
		return AppendV1(b, h.Source, h.Destination)
	}
	if h.Command == CommandLocal {
		return AppendV2Local(b)
	}
	if !h.HasAddrs() {
		return AppendV2(b, h.Transport, netip.AddrPort{}, netip.AddrPort{})
	}
	return AppendV2(b, h.Transport, h.Source, h.Destination)
}

const (
	// MaxV1Len is the longest version 1 line the specification allows,
	// CRLF included ("PROXY UNKNOWN" followed by two full IPv6 addresses
	// and two 5-digit ports).
	MaxV1Len = 107
	// MaxV2AddrLen is the largest version 2 address-and-TLV block (the
	// header's length field) this package accepts. The addresses take at
	// most 216 bytes (AF_UNIX); the rest leaves room for the TLVs that
	// cloud load balancers send (endpoint IDs, ALPN, authority), while a
	// peer cannot make a receiver buffer more than MaxV2Len bytes.
	MaxV2AddrLen = 1024
	// MaxV2Len is the longest version 2 header accepted: the 16-byte fixed
	// part plus MaxV2AddrLen.
	MaxV2Len = v2FixedLen + MaxV2AddrLen
	// MaxV2EncodedLen is the longest header AppendV2 writes (TCP or UDP
	// over IPv6).
	MaxV2EncodedLen = v2FixedLen + v2Inet6Len
)

// v2Signature starts every version 2 header.
const v2Signature = "\r\n\r\n\x00\r\nQUIT\n"

const (
	v2FixedLen = 16 // signature, version/command, family/transport, length
	v2InetLen  = 4 + 4 + 2 + 2
	v2Inet6Len = 16 + 16 + 2 + 2
	v2UnixLen  = 108 + 108
	v2Version  = 0x20

	famUnspec = 0x0
	famInet   = 0x1
	famInet6  = 0x2
	famUnix   = 0x3
)

const v1Unknown = "PROXY UNKNOWN\r\n"

// normalize unmaps an IPv4-mapped IPv6 address and drops any IPv6 zone.
func normalize(ap netip.AddrPort) netip.AddrPort {
	a := ap.Addr().Unmap()
	if a.Is6() {
		a = a.WithZone("")
	}
	return netip.AddrPortFrom(a, ap.Port())
}

// AppendV1 appends a version 1 header for a TCP connection from src to dst:
// "PROXY TCP4 ..." when both are IPv4 (IPv4-mapped IPv6 counts as IPv4),
// "PROXY TCP6 ..." when both are IPv6. When either address is invalid or the
// two are of different families, version 1 has no way to express them and
// the header is "PROXY UNKNOWN\r\n": the receiver then uses the connection's
// own addresses. It allocates nothing when b has MaxV1Len bytes of spare
// capacity.
func AppendV1(b []byte, src, dst netip.AddrPort) []byte {
	if !src.IsValid() || !dst.IsValid() {
		return append(b, v1Unknown...)
	}
	src, dst = normalize(src), normalize(dst)
	switch {
	case src.Addr().Is4() && dst.Addr().Is4():
		b = append(b, "PROXY TCP4 "...)
	case src.Addr().Is6() && dst.Addr().Is6():
		b = append(b, "PROXY TCP6 "...)
	default:
		return append(b, v1Unknown...)
	}
	b = src.Addr().AppendTo(b)
	b = append(b, ' ')
	b = dst.Addr().AppendTo(b)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(src.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(dst.Port()), 10)
	return append(b, '\r', '\n')
}

// AppendV2 appends a version 2 PROXY-command header for a connection (or,
// with TransportDatagram, a datagram) from src to dst. The family is INET
// when both addresses are IPv4 (IPv4-mapped IPv6 counts as IPv4) and INET6
// otherwise; when the families differ the IPv4 one is written as an
// IPv4-mapped IPv6 address, so the client's address still reaches the
// receiver (HAProxy does the same). When either address is invalid or tr is
// not STREAM or DGRAM, the header has family and transport UNSPEC and no
// address: the receiver uses the connection's own addresses. It allocates
// nothing when b has MaxV2EncodedLen bytes of spare capacity.
func AppendV2(b []byte, tr Transport, src, dst netip.AddrPort) []byte {
	b = append(b, v2Signature...)
	if !src.IsValid() || !dst.IsValid() || (tr != TransportStream && tr != TransportDatagram) {
		return append(b, v2Version|byte(CommandProxy), famUnspec<<4|byte(TransportUnspec), 0, 0)
	}
	src, dst = normalize(src), normalize(dst)
	if src.Addr().Is4() && dst.Addr().Is4() {
		b = append(b, v2Version|byte(CommandProxy), famInet<<4|byte(tr), 0, v2InetLen)
		s, d := src.Addr().As4(), dst.Addr().As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		b = append(b, v2Version|byte(CommandProxy), famInet6<<4|byte(tr), 0, v2Inet6Len)
		s, d := src.Addr().As16(), dst.Addr().As16() // As16 maps IPv4
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

// AppendV2Local appends a version 2 LOCAL-command header (no address), as a
// proxy sends on its own connections such as health checks.
func AppendV2Local(b []byte) []byte {
	b = append(b, v2Signature...)
	return append(b, v2Version|byte(CommandLocal), famUnspec<<4|byte(TransportUnspec), 0, 0)
}
