package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// DatagramHeaderLen is the length prefix in front of each datagram on a
// stream: a big-endian uint16 holding the payload length.
const DatagramHeaderLen = 2

// MaxDatagram is the largest datagram the framing can carry. It is also the
// largest UDP payload any IP version allows on a socket.
const MaxDatagram = 65535

// ErrDatagramTooLarge is returned by ReadDatagram for a datagram larger than
// the caller's buffer. The datagram has been skipped; the stream stays in
// sync and the next call returns the next datagram.
var ErrDatagramTooLarge = errors.New("protocol: datagram larger than buffer")

// PutDatagramHeader writes the length prefix for an n-byte payload into
// frame[:DatagramHeaderLen]. Callers read the payload into
// frame[DatagramHeaderLen:] first, so a datagram goes out in one Write
// (one yamux frame) without a copy.
func PutDatagramHeader(frame []byte, n int) error {
	if n < 0 || n > MaxDatagram {
		return fmt.Errorf("protocol: datagram of %d bytes exceeds %d", n, MaxDatagram)
	}
	binary.BigEndian.PutUint16(frame[:DatagramHeaderLen], uint16(n))
	return nil
}

// ReadDatagram reads one length-prefixed datagram from r into buf and
// returns its length. Zero-length datagrams are valid. A datagram that does
// not fit in buf is read and discarded, and ErrDatagramTooLarge returned.
// io.EOF is returned only at a clean boundary between datagrams; a stream
// that ends mid-datagram gives io.ErrUnexpectedEOF. A DatagramReader does
// the same without allocating per call.
func ReadDatagram(r io.Reader, buf []byte) (int, error) {
	d := DatagramReader{R: r}
	return d.ReadDatagram(buf)
}

// DatagramReader reads length-prefixed datagrams from a stream, keeping its
// scratch space for the length prefix so that a read allocates nothing.
type DatagramReader struct {
	R   io.Reader
	hdr [DatagramHeaderLen]byte
}

// ReadDatagram is the package's ReadDatagram on d.R.
func (d *DatagramReader) ReadDatagram(buf []byte) (int, error) {
	if _, err := io.ReadFull(d.R, d.hdr[:]); err != nil {
		return 0, err
	}
	n := int(binary.BigEndian.Uint16(d.hdr[:]))
	if n > len(buf) {
		if _, err := io.CopyN(io.Discard, d.R, int64(n)); err != nil {
			return 0, noEOF(err)
		}
		return 0, fmt.Errorf("%w: %d > %d bytes", ErrDatagramTooLarge, n, len(buf))
	}
	if _, err := io.ReadFull(d.R, buf[:n]); err != nil {
		return 0, noEOF(err)
	}
	return n, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
