package tunnel

import (
	"context"
	"errors"
	"io"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
)

// Stream is one tunneled TCP connection or UDP session, in either mode.
type Stream interface {
	Read(p []byte) (int, error)
	Write(p []byte) (int, error)
	// CloseWrite signals that this side has finished sending (a TCP FIN);
	// the peer reads io.EOF after the data sent before it.
	CloseWrite() error
	// Close releases the stream. Called after both directions ended it is
	// a clean close; before, it aborts the stream like Reset.
	Close() error
	// Reset aborts both directions: the peer's reads and writes fail.
	Reset() error
	// WaitReadable blocks until a Read would not block (data, end of
	// stream or an error), without consuming anything: the relay waits
	// with it so that idle streams hold no copy buffer.
	WaitReadable() error
}

// PacketConn carries the datagrams of one UDP session on a stream, keeping
// their boundaries.
type PacketConn interface {
	// ReadPacket reads one datagram into buf. A datagram larger than buf
	// is discarded and protocol.ErrDatagramTooLarge returned; the conn
	// stays usable.
	ReadPacket(buf []byte) (int, error)
	// WritePacket sends frame[PacketHeadroom:] as one datagram.
	// frame[:PacketHeadroom] is scratch space for the framing, so that
	// callers can read a datagram into frame[PacketHeadroom:] and send it
	// without a copy.
	WritePacket(frame []byte) error
	// WaitReadable blocks until ReadPacket would not block.
	WaitReadable() error
	Close() error
}

// PacketHeadroom is the scratch space WritePacket needs in front of a
// datagram.
const PacketHeadroom = protocol.DatagramHeaderLen

// AsPackets returns the datagram view of a UDP stream.
func AsPackets(st Stream) PacketConn {
	if pc, ok := st.(PacketConn); ok {
		return pc
	}
	return &framedPackets{st: st, r: protocol.DatagramReader{R: st}}
}

// framedPackets length-prefixes datagrams on a byte stream (yamux mode).
type framedPackets struct {
	st Stream
	r  protocol.DatagramReader
}

func (f *framedPackets) ReadPacket(buf []byte) (int, error) { return f.r.ReadDatagram(buf) }

func (f *framedPackets) WritePacket(frame []byte) error {
	if err := protocol.PutDatagramHeader(frame, len(frame)-PacketHeadroom); err != nil {
		return err
	}
	_, err := f.st.Write(frame)
	return err
}

// WriteFramed sends several datagrams in one stream write: frames holds
// them end to end, each framed by protocol.PutDatagramHeader. The relay
// uses it to carry a burst in a few yamux frames instead of one per
// datagram.
func (f *framedPackets) WriteFramed(frames []byte) error {
	_, err := f.st.Write(frames)
	return err
}

func (f *framedPackets) WaitReadable() error { return f.st.WaitReadable() }

func (f *framedPackets) Close() error { return f.st.Close() }

// WaitOpen waits until the agent has answered a stream opened with
// Session.Open. It returns nil for ok, a *protocol.OpenError for any other
// status, or the error that ended the stream or session.
func WaitOpen(ctx context.Context, st Stream) error {
	w, ok := st.(interface{ waitOpen(context.Context) error })
	if !ok {
		return errors.New("tunnel: WaitOpen on a stream that was not opened by Session.Open")
	}
	return w.waitOpen(ctx)
}

// Incoming is a stream the gateway opened, before the agent has answered.
type Incoming struct {
	readHeader func() (protocol.StreamHeader, error)
	reply      func(protocol.Status) (Stream, error)
}

// Header reads the stream header. In yamux mode this reads from the stream
// (bounded by the session's handshake timeout), so call it from the
// goroutine that handles the stream, not the accept loop.
func (in *Incoming) Header() (protocol.StreamHeader, error) { return in.readHeader() }

// Accept answers StatusOK and returns the stream to relay.
func (in *Incoming) Accept() (Stream, error) { return in.reply(protocol.StatusOK) }

// Reject answers status (anything but StatusOK) and closes the stream.
func (in *Incoming) Reject(status protocol.Status) error {
	if status == protocol.StatusOK {
		status = protocol.StatusError
	}
	_, err := in.reply(status)
	return err
}

func getCopy(b []byte) *[]byte {
	buf := pool.Get(len(b))
	copy(*buf, b)
	return buf
}

var _ io.ReadWriter = Stream(nil)
