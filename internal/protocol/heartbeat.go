package protocol

import (
	"bytes"
	"strconv"
)

// Heartbeats go both ways on every idle session, every interval: with ten
// thousand agents on a gateway they are most of what it does. Like data
// and credit messages they have a hand-written encoder, and a decoder for
// its exact form; encoding/json handles every other spelling.
var (
	heartbeatPrefix    = []byte(`{"type":"heartbeat","seq":`)
	heartbeatAckPrefix = []byte(`{"type":"heartbeat_ack","seq":`)
	heartbeatTSMid     = []byte(`,"ts":`)
)

// HeartbeatLen bounds the length of a message AppendHeartbeat writes.
const HeartbeatLen = len(`{"type":"heartbeat_ack","seq":18446744073709551615,"ts":-9223372036854775808}`)

// AppendHeartbeat appends a heartbeat (or, with ack, a heartbeat_ack)
// message, the same bytes Encode writes for it.
func AppendHeartbeat(dst []byte, ack bool, seq uint64, ts int64) []byte {
	if ack {
		dst = append(dst, heartbeatAckPrefix...)
	} else {
		dst = append(dst, heartbeatPrefix...)
	}
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, heartbeatTSMid...)
	dst = strconv.AppendInt(dst, ts, 10)
	return append(dst, '}')
}

// parseHeartbeatFast recognises a heartbeat or heartbeat_ack in the exact
// form AppendHeartbeat writes (numbers of at most 18 digits, so none
// overflows). ok is false for anything else, which may still be valid.
func parseHeartbeatFast(b []byte) (m Message, ok bool) {
	ack := false
	if rest, found := bytes.CutPrefix(b, heartbeatPrefix); found {
		b = rest
	} else if rest, found := bytes.CutPrefix(b, heartbeatAckPrefix); found {
		b, ack = rest, true
	} else {
		return nil, false
	}
	seq, b, ok := cutDigits(b)
	if !ok {
		return nil, false
	}
	if b, ok = bytes.CutPrefix(b, heartbeatTSMid); !ok {
		return nil, false
	}
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	ts, b, ok := cutDigits(b)
	if !ok || string(b) != "}" || (neg && ts == 0) {
		return nil, false
	}
	hb := Heartbeat{Seq: seq, TS: int64(ts)}
	if neg {
		hb.TS = -hb.TS
	}
	if ack {
		a := HeartbeatAck(hb)
		return &a, true
	}
	return &hb, true
}

// cutDigits reads a JSON unsigned integer of 1 to 18 digits without
// leading zeros.
func cutDigits(b []byte) (v uint64, rest []byte, ok bool) {
	i := 0
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		if i == 18 {
			return 0, b, false
		}
		v = v*10 + uint64(b[i]-'0')
	}
	if i == 0 || (b[0] == '0' && i > 1) {
		return 0, b, false
	}
	return v, b[i:], true
}
