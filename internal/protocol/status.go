// Package protocol defines portway's wire formats: the JSON control messages
// exchanged as WebSocket text messages, the binary stream header and status
// byte that start every tunneled stream, and the length-prefixed framing that
// keeps UDP datagrams whole on a byte stream. docs/protocol.md describes the
// same formats byte by byte; the two must agree.
//
// Every decoder here validates what it reads and returns an error naming the
// problem; none of them panics on any input (each has a fuzz target).
package protocol

import "fmt"

// Status is the agent's answer to a stream open: one byte on a yamux stream,
// a name in JSON mode. The agent sends it before any data, so the gateway can
// close the client cleanly when the answer is not StatusOK.
type Status uint8

// Stream open results.
const (
	StatusOK             Status = 0 // backend dialed; data follows
	StatusRefused        Status = 1 // backend refused the connection
	StatusTimeout        Status = 2 // backend dial timed out
	StatusUnknownService Status = 3 // the agent has no such registered service
	StatusOverLimit      Status = 4 // max_connections / max_sessions reached
	StatusError          Status = 5 // any other failure (bad header, dial error)
)

var statusNames = [...]string{
	StatusOK:             "ok",
	StatusRefused:        "refused",
	StatusTimeout:        "timeout",
	StatusUnknownService: "unknown_service",
	StatusOverLimit:      "over_limit",
	StatusError:          "error",
}

// String returns the status name used in JSON mode and in logs.
func (s Status) String() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// Valid reports whether s is one of the defined statuses.
func (s Status) Valid() bool { return int(s) < len(statusNames) }

// ParseStatusByte validates a status byte read from a stream.
func ParseStatusByte(b byte) (Status, error) {
	s := Status(b)
	if !s.Valid() {
		return 0, fmt.Errorf("protocol: unknown stream status byte %d", b)
	}
	return s, nil
}

// ParseStatus parses a status name as used in JSON mode.
func ParseStatus(name string) (Status, error) {
	for i, n := range statusNames {
		if n == name {
			return Status(i), nil
		}
	}
	return 0, fmt.Errorf("protocol: unknown stream status %q", name)
}

// MarshalText implements encoding.TextMarshaler, so JSON carries the name.
func (s Status) MarshalText() ([]byte, error) {
	if !s.Valid() {
		return nil, fmt.Errorf("protocol: invalid status %d", uint8(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Status) UnmarshalText(b []byte) error {
	v, err := ParseStatus(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// OpenError is returned by a stream open that the agent answered with a
// status other than StatusOK.
type OpenError struct{ Status Status }

func (e *OpenError) Error() string { return "agent answered " + e.Status.String() }
