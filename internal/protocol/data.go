package protocol

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strconv"
)

// JSON mode moves every byte of every stream through tcp_data and udp_data
// messages, so these have a hand-written encoder and a fast decoder for the
// exact form the encoder writes. Any other spelling of the same message (other
// field order, whitespace) still decodes, through encoding/json.

var (
	dataPrefix = []byte(`{"type":"`)
	dataMid    = []byte(`","id":`)
	dataField  = []byte(`,"data":"`)
	dataSuffix = []byte(`"}`)
)

// DataOverhead is an upper bound on the bytes a data message adds around its
// base64 payload.
const DataOverhead = len(`{"type":"tcp_data","id":4294967295,"data":""}`)

// MaxDataPayload returns the largest payload whose data message fits in
// maxMessage bytes.
func MaxDataPayload(maxMessage int) int {
	n := base64.StdEncoding.DecodedLen(maxMessage - DataOverhead)
	return n - n%3 // keep payloads multiple of 3: no padding mid-stream
}

// AppendData appends a tcp_data or udp_data message carrying payload to dst.
func AppendData(dst []byte, kind Kind, id uint32, payload []byte) []byte {
	dst = append(dst, dataPrefix...)
	dst = append(dst, kindType(kind, TypeTCPData, TypeUDPData)...)
	dst = append(dst, dataMid...)
	dst = strconv.AppendUint(dst, uint64(id), 10)
	dst = append(dst, dataField...)
	n := len(dst)
	enc := base64.StdEncoding.EncodedLen(len(payload))
	dst = grow(dst, enc)
	base64.StdEncoding.Encode(dst[n:n+enc], payload)
	return append(dst[:n+enc], dataSuffix...)
}

func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b[:len(b)+n]
	}
	nb := make([]byte, len(b)+n, 2*cap(b)+n)
	copy(nb, b)
	return nb
}

// ParseDataFast recognises a data message in the exact form AppendData
// writes and returns its kind, stream id and base64 payload without decoding
// it. ok is false for anything else (which may still be a valid message:
// use Decode). When ok and the payload decodes with DecodePayload, the
// message is valid JSON and means what encoding/json makes of it.
func ParseDataFast(b []byte) (kind Kind, id uint32, payload []byte, ok bool) {
	if !bytes.HasPrefix(b, dataPrefix) {
		return 0, 0, nil, false
	}
	b = b[len(dataPrefix):]
	switch {
	case bytes.HasPrefix(b, []byte(TypeTCPData)):
		kind = KindTCP
	case bytes.HasPrefix(b, []byte(TypeUDPData)):
		kind = KindUDP
	default:
		return 0, 0, nil, false
	}
	b = b[len(TypeTCPData):] // both names have the same length
	if !bytes.HasPrefix(b, dataMid) {
		return 0, 0, nil, false
	}
	b = b[len(dataMid):]
	id, b, ok = cutUint32(b)
	if !ok || id == 0 {
		return 0, 0, nil, false
	}
	// The length check matters: prefix and suffix may overlap (`,"data":"}`).
	if len(b) < len(dataField)+len(dataSuffix) || !bytes.HasPrefix(b, dataField) || !bytes.HasSuffix(b, dataSuffix) {
		return 0, 0, nil, false
	}
	payload = b[len(dataField) : len(b)-len(dataSuffix)]
	// Whatever else is not base64 fails in DecodePayload.
	if bytes.IndexByte(payload, '"') >= 0 || bytes.IndexByte(payload, '\\') >= 0 {
		return 0, 0, nil, false
	}
	return kind, id, payload, true
}

// cutUint32 parses the decimal number at the start of b, spelled as JSON
// spells it (no sign, no leading zero), and returns it and the rest of b.
func cutUint32(b []byte) (v uint32, rest []byte, ok bool) {
	var n uint64
	i := 0
	for ; i < len(b) && i < 11 && b[i] >= '0' && b[i] <= '9'; i++ {
		n = n*10 + uint64(b[i]-'0')
	}
	if i == 0 || n > 1<<32-1 || (b[0] == '0' && i > 1) {
		return 0, b, false
	}
	return uint32(n), b[i:], true
}

// Credit messages flow back for every few data messages in JSON mode, so
// they too have a hand-written encoder and a decoder for its exact form.
var (
	creditPrefix = []byte(`{"type":"credit","id":`)
	creditMid    = []byte(`,"bytes":`)
)

// CreditLen bounds the length of a credit message AppendCredit writes.
const CreditLen = len(`{"type":"credit","id":4294967295,"bytes":4294967295}`)

// AppendCredit appends a credit message to dst, in the form Encode writes.
func AppendCredit(dst []byte, id, n uint32) []byte {
	dst = append(dst, creditPrefix...)
	dst = strconv.AppendUint(dst, uint64(id), 10)
	dst = append(dst, creditMid...)
	dst = strconv.AppendUint(dst, uint64(n), 10)
	return append(dst, '}')
}

// ParseCreditFast recognises a valid credit message in the exact form
// AppendCredit writes. ok is false for anything else (which may still be a
// valid message: use Decode).
func ParseCreditFast(b []byte) (id, n uint32, ok bool) {
	if b, ok = bytes.CutPrefix(b, creditPrefix); !ok {
		return 0, 0, false
	}
	if id, b, ok = cutUint32(b); !ok || id == 0 {
		return 0, 0, false
	}
	if b, ok = bytes.CutPrefix(b, creditMid); !ok {
		return 0, 0, false
	}
	if n, b, ok = cutUint32(b); !ok || n == 0 || string(b) != "}" {
		return 0, 0, false
	}
	return id, n, true
}

func decodeDataFast(b []byte) (*Data, bool) {
	kind, id, enc, ok := ParseDataFast(b)
	if !ok {
		return nil, false
	}
	buf := make([]byte, base64.StdEncoding.DecodedLen(len(enc)))
	n, err := DecodePayload(buf, enc)
	if err != nil {
		return nil, false // let encoding/json report the error
	}
	return &Data{Kind: kind, ID: id, Data: buf[:n]}, true
}

// errRawNewline is DecodePayload's error for a payload holding \r or \n.
var errRawNewline = errors.New("protocol: raw line break in base64 data")

// DecodePayload decodes a base64 payload returned by ParseDataFast into dst,
// which must hold at least base64.StdEncoding.DecodedLen(len(enc)) bytes.
// Like encoding/json, it refuses a raw \r or \n in the payload, which the
// base64 decoder would skip.
func DecodePayload(dst, enc []byte) (int, error) {
	n, err := base64.StdEncoding.Decode(dst, enc)
	if err != nil {
		return 0, err
	}
	// Line breaks are the only bytes the decoder skips, and every four of
	// them it skipped would leave three bytes fewer than the payload's
	// length promises: checking the count costs no second pass.
	if len(enc)%4 != 0 || n != len(enc)/4*3-trailingPad(enc) {
		return 0, errRawNewline
	}
	return n, nil
}

// trailingPad counts the '=' at the end of enc (at most 2).
func trailingPad(enc []byte) int {
	p := 0
	for p < 2 && p < len(enc) && enc[len(enc)-1-p] == '=' {
		p++
	}
	return p
}
