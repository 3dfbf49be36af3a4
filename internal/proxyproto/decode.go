package proxyproto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

var (
	// ErrNoHeader is wrapped by the parse errors for input that does not
	// start with a PROXY protocol header at all (a client that bypassed
	// the load balancer, or a sender not configured for the protocol).
	ErrNoHeader = errors.New("proxyproto: no PROXY protocol header")
	// ErrInvalid is wrapped by the parse errors for a header that starts
	// like a PROXY protocol header but does not follow the specification.
	ErrInvalid = errors.New("proxyproto: invalid PROXY protocol header")
)

// minHeaderLen is the shortest header of either version ("PROXY
// UNKNOWN\r\n"); reading this many bytes first never reads past a header.
const minHeaderLen = len(v1Unknown)

const v1Prefix = "PROXY "

// Read reads one PROXY protocol header, version 1 or 2, from r and returns
// it. It reads exactly the header's bytes and not one more, so that r (a
// net.Conn, typically) can be handed on unchanged with the client's data
// intact. A version 1 line is therefore read in a few short reads, each no
// longer than what the rest of the line must still contain. The input is
// bounded by MaxV1Len or MaxV2Len bytes. Read does not set deadlines: the
// caller sets one on the conn (the specification suggests a few seconds)
// so a peer that sends half a header cannot hold the goroutine.
//
// Errors wrap ErrNoHeader, ErrInvalid, or the read error (io.EOF or
// io.ErrUnexpectedEOF when the input ends early, a timeout, ...).
func Read(r io.Reader) (Header, error) {
	var buf [MaxV2Len]byte
	n, need := 0, minHeaderLen
	// Every round reads at least one byte and n never exceeds MaxV2Len, so
	// the loop is bounded.
	for n < len(buf) {
		m, err := io.ReadFull(r, buf[n:need])
		n += m
		if err != nil {
			// A peer that sent garbage and closed learns why.
			if _, _, _, perr := parse(buf[:n]); perr != nil {
				return Header{}, perr
			}
			return Header{}, fmt.Errorf("proxyproto: reading header (%d bytes read): %w", n, err)
		}
		h, hl, next, err := parse(buf[:n])
		switch {
		case err != nil:
			return Header{}, err
		case hl == n:
			return h, nil
		case hl > 0 || next <= n || next > len(buf):
			// parse's lower bound on the header length was wrong;
			// never expected, but the caller must not use the conn.
			return Header{}, fmt.Errorf("proxyproto: internal error: read %d bytes, header %d, next %d", n, hl, next)
		}
		need = next
	}
	return Header{}, fmt.Errorf("%w: longer than %d bytes", ErrInvalid, MaxV2Len)
}

// ReadBuffered reads one PROXY protocol header from br and consumes exactly
// its bytes: whatever br has buffered beyond the header (the client's data)
// stays in br for the caller to read. br must be able to buffer MaxV2Len
// bytes (bufio.NewReader's default size does). Errors are as for Read.
func ReadBuffered(br *bufio.Reader) (Header, error) {
	if br.Size() < MaxV2Len {
		return Header{}, fmt.Errorf("proxyproto: bufio.Reader of %d bytes cannot hold a %d-byte header", br.Size(), MaxV2Len)
	}
	need := minHeaderLen
	for {
		// Use what is buffered already, but block only for need bytes.
		b, err := br.Peek(max(need, min(br.Buffered(), MaxV2Len)))
		if err != nil {
			if _, _, _, perr := parse(b); perr != nil {
				return Header{}, perr
			}
			return Header{}, fmt.Errorf("proxyproto: reading header (%d bytes read): %w", len(b), err)
		}
		h, hl, next, err := parse(b)
		if err != nil {
			return Header{}, err
		}
		if hl > 0 {
			if _, err := br.Discard(hl); err != nil {
				return Header{}, fmt.Errorf("proxyproto: consuming header: %w", err)
			}
			return h, nil
		}
		// parse guarantees next > len(b) and next <= MaxV2Len, so every
		// round blocks for more input and the loop ends within MaxV2Len
		// rounds.
		if next <= len(b) || next > MaxV2Len {
			return Header{}, fmt.Errorf("proxyproto: internal error: have %d bytes, next %d", len(b), next)
		}
		need = next
	}
}

// Parse parses the PROXY protocol header, version 1 or 2, at the start of b
// and returns it with its length in bytes; b[n:] is the data after it. When b
// holds only the start of a header the error wraps io.ErrUnexpectedEOF;
// otherwise errors wrap ErrNoHeader or ErrInvalid.
func Parse(b []byte) (h Header, n int, err error) {
	h, n, need, err := parse(b)
	if err != nil {
		return Header{}, 0, err
	}
	if n == 0 {
		return Header{}, 0, fmt.Errorf("proxyproto: header incomplete, %d bytes of at least %d: %w", len(b), need, io.ErrUnexpectedEOF)
	}
	return h, n, nil
}

// ParseDatagram parses the version 2 header at the start of a UDP datagram
// and returns it with the offset of the payload (b[off:]). The header must
// be complete, version 2 (version 1 has no datagram form), and either a
// DGRAM or UNSPEC transport, or a LOCAL command; errors wrap ErrNoHeader or
// ErrInvalid.
func ParseDatagram(b []byte) (h Header, off int, err error) {
	if !bytes.HasPrefix(b, []byte(v2Signature)) {
		return Header{}, 0, fmt.Errorf("%w: datagram does not start with the version 2 signature", ErrNoHeader)
	}
	h, n, _, err := parse(b)
	if err != nil {
		return Header{}, 0, err
	}
	if n == 0 {
		return Header{}, 0, fmt.Errorf("%w: datagram of %d bytes ends inside its header", ErrInvalid, len(b))
	}
	if h.Transport == TransportStream {
		return Header{}, 0, fmt.Errorf("%w: STREAM header on a datagram", ErrInvalid)
	}
	return h, n, nil
}

// parse examines the start of the input in b. Exactly one of these holds on
// return: err != nil (not a header, or an invalid one); n > 0 (a complete
// header of n bytes, described by h); need > len(b) (b is the start of a
// possible header, which is at least need bytes long; need never exceeds
// MaxV2Len, nor MaxV1Len for version 1).
func parse(b []byte) (h Header, n, need int, err error) {
	switch {
	case len(b) == 0:
		return Header{}, 0, minHeaderLen, nil
	case b[0] == v2Signature[0]:
		return parseV2(b)
	case b[0] == v1Prefix[0]:
		return parseV1(b)
	}
	return Header{}, 0, 0, fmt.Errorf("%w: input starts with %q", ErrNoHeader, b[:min(len(b), 8)])
}

func parseV2(b []byte) (h Header, n, need int, err error) {
	sig := min(len(b), len(v2Signature))
	if string(b[:sig]) != v2Signature[:sig] {
		return Header{}, 0, 0, fmt.Errorf("%w: input starts with %q", ErrNoHeader, b[:min(len(b), 12)])
	}
	if len(b) < v2FixedLen {
		return Header{}, 0, v2FixedLen, nil
	}
	if v := b[12] >> 4; v != 2 {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 signature with version %d", ErrInvalid, v)
	}
	cmd := Command(b[12] & 0xf)
	if cmd != CommandLocal && cmd != CommandProxy {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 command %#x (want LOCAL 0x0 or PROXY 0x1)", ErrInvalid, byte(cmd))
	}
	fam, tr := b[13]>>4, Transport(b[13]&0xf)
	if fam > famUnix {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 address family %#x", ErrInvalid, fam)
	}
	if tr > TransportDatagram {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 transport protocol %#x", ErrInvalid, byte(tr))
	}
	l := int(binary.BigEndian.Uint16(b[14:16]))
	if l > MaxV2AddrLen {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 address block of %d bytes exceeds the limit of %d", ErrInvalid, l, MaxV2AddrLen)
	}
	total := v2FixedLen + l
	if len(b) < total {
		return Header{}, 0, total, nil
	}
	h = Header{Version: 2, Command: cmd}
	if cmd == CommandLocal {
		// The specification: the receiver discards the block, family
		// included, and uses the real connection endpoints.
		return h, total, 0, nil
	}
	var addrLen int
	switch fam {
	case famInet:
		addrLen = v2InetLen
	case famInet6:
		addrLen = v2Inet6Len
	default:
		// AF_UNSPEC, or AF_UNIX (no IP address to report): the
		// receiver uses the real endpoints and skips the block.
		return h, total, 0, nil
	}
	if tr == TransportUnspec {
		// Family known but transport not: ignore the addresses.
		return h, total, 0, nil
	}
	if l < addrLen {
		return Header{}, 0, 0, fmt.Errorf("%w: v2 address block of %d bytes is shorter than the %d bytes its family needs", ErrInvalid, l, addrLen)
	}
	body := b[v2FixedLen:total]
	var src, dst netip.Addr
	if fam == famInet {
		src = netip.AddrFrom4([4]byte(body[0:4]))
		dst = netip.AddrFrom4([4]byte(body[4:8]))
	} else {
		src = netip.AddrFrom16([16]byte(body[0:16])).Unmap()
		dst = netip.AddrFrom16([16]byte(body[16:32])).Unmap()
	}
	ports := body[addrLen-4 : addrLen]
	if err := checkTLVs(body[addrLen:]); err != nil {
		return Header{}, 0, 0, err
	}
	h.Transport = tr
	h.Source = netip.AddrPortFrom(src, binary.BigEndian.Uint16(ports[0:2]))
	h.Destination = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(ports[2:4]))
	return h, total, 0, nil
}

// checkTLVs checks that the bytes after the addresses are a sequence of
// whole TLVs (type, 2-byte length, value). Their contents are skipped: no
// TLV changes what this package reports. At most MaxV2AddrLen/3 rounds.
func checkTLVs(b []byte) error {
	for len(b) > 0 {
		if len(b) < 3 {
			return fmt.Errorf("%w: v2 TLV area ends with %d stray bytes", ErrInvalid, len(b))
		}
		l := int(binary.BigEndian.Uint16(b[1:3]))
		if 3+l > len(b) {
			return fmt.Errorf("%w: v2 TLV of type %#x claims %d bytes, %d left", ErrInvalid, b[0], l, len(b)-3)
		}
		b = b[3+l:]
	}
	return nil
}

func parseV1(b []byte) (h Header, n, need int, err error) {
	pre := min(len(b), len(v1Prefix))
	if string(b[:pre]) != v1Prefix[:pre] {
		return Header{}, 0, 0, fmt.Errorf("%w: input starts with %q", ErrNoHeader, b[:min(len(b), 8)])
	}
	// Find the CRLF within the first MaxV1Len bytes; a lone CR or LF is
	// invalid.
	scan := b[:min(len(b), MaxV1Len)]
	end := -1
	for i, c := range scan {
		if c == '\n' {
			if i == 0 || scan[i-1] != '\r' {
				return Header{}, 0, 0, fmt.Errorf("%w: v1 line has LF without CR", ErrInvalid)
			}
			end = i + 1
			break
		}
		if c == '\r' && i+1 < len(scan) && scan[i+1] != '\n' {
			return Header{}, 0, 0, fmt.Errorf("%w: v1 line has CR without LF", ErrInvalid)
		}
	}
	if end < 0 {
		if len(b) >= MaxV1Len {
			return Header{}, 0, 0, fmt.Errorf("%w: v1 line has no CRLF in its first %d bytes", ErrInvalid, MaxV1Len)
		}
		need, err := v1Need(b)
		if err != nil {
			return Header{}, 0, 0, err
		}
		if need > MaxV1Len {
			return Header{}, 0, 0, fmt.Errorf("%w: v1 line cannot end within %d bytes", ErrInvalid, MaxV1Len)
		}
		return Header{}, 0, need, nil
	}
	h, err = parseV1Line(b[len(v1Prefix) : end-2])
	if err != nil {
		return Header{}, 0, 0, err
	}
	return h, end, 0, nil
}

// v1Need returns a lower bound on the length of the v1 line that b (no CRLF
// yet) starts, from the shortest values the remaining fields can take, so a
// reader can ask for that many bytes without reading past a valid line. It
// also rejects bytes that cannot occur in a TCP4/TCP6 line, so garbage is
// refused early.
func v1Need(b []byte) (int, error) {
	crlf := 2
	if b[len(b)-1] == '\r' {
		crlf = 1
	}
	if len(b) <= len(v1Prefix) {
		return max(minHeaderLen, len(b)+crlf), nil
	}
	rest := b[len(v1Prefix):]
	sp := bytes.IndexByte(rest, ' ')
	if sp < 0 {
		// The protocol name is still incomplete (or ends the line,
		// which only UNKNOWN may do).
		name := trimCR(rest)
		if !isPrefixOfAny(name, "TCP4", "TCP6", "UNKNOWN") {
			return 0, fmt.Errorf("%w: v1 protocol %q (want TCP4, TCP6 or UNKNOWN)", ErrInvalid, name)
		}
		return max(minHeaderLen, len(b)+crlf), nil
	}
	var mins [4]int // shortest source, destination, source port, destination port
	switch string(rest[:sp]) {
	case "TCP4":
		mins = [4]int{len("0.0.0.0"), len("0.0.0.0"), 1, 1}
	case "TCP6":
		mins = [4]int{len("::"), len("::"), 1, 1}
	case "UNKNOWN":
		// Anything may follow, up to the CRLF.
		return max(minHeaderLen, len(b)+crlf), nil
	default:
		return 0, fmt.Errorf("%w: v1 protocol %q (want TCP4, TCP6 or UNKNOWN)", ErrInvalid, rest[:sp])
	}
	done, cur, err := scanV1Fields(rest[:sp], trimCR(rest[sp+1:]))
	if err != nil {
		return 0, err
	}
	if crlf == 1 && done < 3 {
		return 0, fmt.Errorf("%w: v1 line ends after %d of 6 fields", ErrInvalid, v1FieldsSeen(done, cur))
	}
	rem := max(0, mins[done]-cur)
	for j := done + 1; j < len(mins); j++ {
		rem += 1 + mins[j]
	}
	return len(b) + rem + crlf, nil
}

// scanV1Fields checks the address and port fields of a TCP4/TCP6 line, or
// the start of them: only address and port characters, single spaces, at
// most 4 fields. It returns the number of complete fields (those followed by
// a space) and the length of the last, incomplete one.
func scanV1Fields(proto, fields []byte) (done, cur int, err error) {
	start := 0 // of the current field
	for i, c := range fields {
		switch {
		case c == ' ':
			if i == start {
				return 0, 0, fmt.Errorf("%w: v1 line has an empty field", ErrInvalid)
			}
			done++
			start = i + 1
			if done > 3 {
				return 0, 0, fmt.Errorf("%w: v1 line has more than 6 fields", ErrInvalid)
			}
		case isHex(c) || c == '.' || c == ':':
		default:
			return 0, 0, fmt.Errorf("%w: v1 %s line has unexpected byte %q", ErrInvalid, proto, c)
		}
	}
	return done, len(fields) - start, nil
}

// v1FieldsSeen is the number of fields of a TCP4/TCP6 line, "PROXY" and
// the protocol included, given scanV1Fields' results.
func v1FieldsSeen(done, cur int) int {
	if cur > 0 {
		return done + 3
	}
	return done + 2
}

// parseV1Line parses a complete v1 line without "PROXY " and CRLF.
func parseV1Line(line []byte) (Header, error) {
	if p, rest, ok := bytes.Cut(line, []byte(" ")); ok && (string(p) == "TCP4" || string(p) == "TCP6") {
		done, cur, err := scanV1Fields(p, rest)
		switch {
		case err != nil:
			return Header{}, err
		case done < 3:
			return Header{}, fmt.Errorf("%w: v1 line ends after %d of 6 fields", ErrInvalid, v1FieldsSeen(done, cur))
		case cur == 0:
			return Header{}, fmt.Errorf("%w: v1 line has an empty field", ErrInvalid)
		}
	}
	var f [6][]byte
	nf := 0
	for rest := line; ; {
		i := bytes.IndexByte(rest, ' ')
		if i < 0 || nf == len(f)-1 {
			f[nf] = rest
			nf++
			break
		}
		f[nf] = rest[:i]
		nf++
		rest = rest[i+1:]
	}
	proto := string(f[0])
	switch proto {
	case "UNKNOWN":
		// The receiver must ignore the rest of the line.
		return Header{Version: 1, Command: CommandProxy}, nil
	case "TCP4", "TCP6":
	default:
		return Header{}, fmt.Errorf("%w: v1 protocol %q (want TCP4, TCP6 or UNKNOWN)", ErrInvalid, f[0])
	}
	if nf != 5 || bytes.IndexByte(f[4], ' ') >= 0 {
		return Header{}, fmt.Errorf("%w: v1 %s line %q does not have exactly 6 fields separated by single spaces", ErrInvalid, proto, line)
	}
	src, err := parseV1Addr(proto, "source", f[1])
	if err != nil {
		return Header{}, err
	}
	dst, err := parseV1Addr(proto, "destination", f[2])
	if err != nil {
		return Header{}, err
	}
	sport, err := parseV1Port("source", f[3])
	if err != nil {
		return Header{}, err
	}
	dport, err := parseV1Port("destination", f[4])
	if err != nil {
		return Header{}, err
	}
	return Header{
		Version:     1,
		Command:     CommandProxy,
		Transport:   TransportStream,
		Source:      netip.AddrPortFrom(src, sport),
		Destination: netip.AddrPortFrom(dst, dport),
	}, nil
}

func parseV1Addr(proto, which string, s []byte) (netip.Addr, error) {
	a, err := netip.ParseAddr(string(s))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%w: v1 %s address: %w", ErrInvalid, which, err)
	}
	switch {
	case a.Zone() != "":
		return netip.Addr{}, fmt.Errorf("%w: v1 %s address %q has a zone", ErrInvalid, which, s)
	case proto == "TCP4" && !a.Is4():
		return netip.Addr{}, fmt.Errorf("%w: v1 TCP4 line with non-IPv4 %s address %q", ErrInvalid, which, s)
	case proto == "TCP6" && !a.Is6():
		return netip.Addr{}, fmt.Errorf("%w: v1 TCP6 line with non-IPv6 %s address %q", ErrInvalid, which, s)
	}
	return a.Unmap(), nil
}

func parseV1Port(which string, s []byte) (uint16, error) {
	if len(s) == 0 || len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("%w: v1 %s port %q (want 0-65535 without leading zeros)", ErrInvalid, which, s)
	}
	v := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("%w: v1 %s port %q is not a decimal number", ErrInvalid, which, s)
		}
		v = v*10 + int(c-'0')
	}
	if v > 65535 {
		return 0, fmt.Errorf("%w: v1 %s port %d is out of range", ErrInvalid, which, v)
	}
	return uint16(v), nil
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func trimCR(b []byte) []byte { return bytes.TrimSuffix(b, []byte("\r")) }

// isPrefixOfAny reports whether b is a prefix of one of names.
func isPrefixOfAny(b []byte, names ...string) bool {
	for _, n := range names {
		if len(b) <= len(n) && string(b) == n[:len(b)] {
			return true
		}
	}
	return false
}
