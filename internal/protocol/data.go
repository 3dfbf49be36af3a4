package protocol

import (
	"bytes"
	"encoding/base64"
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
// use Decode).
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
	var v uint64
	i := 0
	for ; i < len(b) && i < 10 && b[i] >= '0' && b[i] <= '9'; i++ {
		v = v*10 + uint64(b[i]-'0')
	}
	if i == 0 || v == 0 || v > 1<<32-1 {
		return 0, 0, nil, false
	}
	b = b[i:]
	// The length check matters: prefix and suffix may overlap (`,"data":"}`).
	if len(b) < len(dataField)+len(dataSuffix) || !bytes.HasPrefix(b, dataField) || !bytes.HasSuffix(b, dataSuffix) {
		return 0, 0, nil, false
	}
	payload = b[len(dataField) : len(b)-len(dataSuffix)]
	if bytes.IndexByte(payload, '"') >= 0 || bytes.IndexByte(payload, '\\') >= 0 {
		return 0, 0, nil, false
	}
	return kind, uint32(v), payload, true
}

func decodeDataFast(b []byte) (*Data, bool) {
	kind, id, enc, ok := ParseDataFast(b)
	if !ok {
		return nil, false
	}
	buf := make([]byte, base64.StdEncoding.DecodedLen(len(enc)))
	n, err := base64.StdEncoding.Decode(buf, enc)
	if err != nil {
		return nil, false // let encoding/json report the error
	}
	return &Data{Kind: kind, ID: id, Data: buf[:n]}, true
}

// DecodePayload decodes a base64 payload returned by ParseDataFast into dst,
// which must hold at least base64.StdEncoding.DecodedLen(len(enc)) bytes.
func DecodePayload(dst, enc []byte) (int, error) {
	return base64.StdEncoding.Decode(dst, enc)
}
