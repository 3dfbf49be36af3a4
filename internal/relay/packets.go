package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
)

// PacketConn is the tunnel side of a UDP session (tunnel.PacketConn).
type PacketConn interface {
	ReadPacket(buf []byte) (int, error)
	WritePacket(frame []byte) error
	WaitReadable() error
	Close() error
}

// Headroom is the scratch space PacketConn.WritePacket needs in front of a
// datagram (tunnel.PacketHeadroom).
const Headroom = protocol.DatagramHeaderLen

// Datagrams is the socket side of a UDP session: a connected UDP socket on
// the agent, one client of a shared public socket on the gateway.
type Datagrams interface {
	// ReadDatagram reads one datagram; a datagram longer than buf is
	// truncated to len(buf), so callers pass one byte more than they
	// accept to detect oversized ones.
	ReadDatagram(buf []byte) (int, error)
	WriteDatagram(b []byte) error
	Close() error
}

// PacketStats counts one UDP session; fields may be read while it runs.
type PacketStats struct {
	// ToTunnel counts datagrams read from the socket side and sent into
	// the tunnel; FromTunnel the other way.
	ToTunnel, FromTunnel           atomic.Int64
	BytesToTunnel, BytesFromTunnel atomic.Int64
	// TooLarge counts datagrams dropped for being larger than the
	// session's maximum, either way (Result.TooLarge once it ends).
	TooLarge   atomic.Int64
	lastActive atomic.Int64
}

// DropCounter is a PacketConn that drops datagrams arriving from the
// tunnel while its receive queue is full, and counts them: a JSON-mode
// stream, where UDP has no flow control. PipePackets returns the count as
// Result.QueueFull; a PacketConn without it never drops.
type DropCounter interface {
	Dropped() uint64
}

// PacketOptions tune a UDP session.
type PacketOptions struct {
	// MaxDatagram is the largest datagram passed whole; larger ones are
	// dropped and counted, never truncated.
	MaxDatagram int
	// IdleTimeout ends the session after this long without a datagram in
	// either direction (udp.session_timeout); 0 disables it.
	IdleTimeout time.Duration
	// Prefix is written in front of every datagram from the tunnel to
	// the socket side (a PROXY protocol header), in the same pooled
	// buffer: no allocation and no second copy per datagram. A datagram
	// that no longer fits a UDP datagram (64 KiB) with it is dropped and
	// counted as too large.
	Prefix []byte
}

// PipePackets relays datagrams between the tunnel and the socket side until
// either ends or the session idles out, then closes both. The Result
// counts the datagrams the session dropped, by reason.
func PipePackets(tun PacketConn, sock Datagrams, opt PacketOptions, st *PacketStats) Result {
	if opt.MaxDatagram <= 0 || opt.MaxDatagram > protocol.MaxDatagram {
		opt.MaxDatagram = protocol.MaxDatagram
	}
	if st == nil {
		st = new(PacketStats)
	}
	st.lastActive.Store(monotonic())
	var (
		once    sync.Once
		errMu   sync.Mutex
		first   error
		closeUp = func(err error) {
			errMu.Lock()
			if first == nil {
				first = err
			}
			errMu.Unlock()
			once.Do(func() { tun.Close(); sock.Close() })
		}
	)
	stopIdle := watchIdle(opt.IdleTimeout, &st.lastActive, func() { closeUp(ErrIdle) })
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		closeUp(toTunnel(tun, sock, opt.MaxDatagram, st))
	}()
	closeUp(fromTunnel(tun, sock, opt.MaxDatagram, opt.Prefix, st))
	wg.Wait()
	stopIdle()
	res := Result{TooLarge: st.TooLarge.Load()}
	if dc, ok := tun.(DropCounter); ok {
		res.QueueFull = int64(dc.Dropped())
	}
	errMu.Lock()
	if first != io.EOF && !isClosed(first) {
		res.Err = first
	}
	errMu.Unlock()
	return res
}

// waiter is a Datagrams that can say, without blocking, whether a
// datagram is waiting to be read.
type waiter interface{ Waiting() bool }

// framedWriter is a PacketConn that can send several datagrams, each
// framed by protocol.PutDatagramHeader and laid end to end, in one write
// (a stream, in yamux mode).
type framedWriter interface{ WriteFramed(frames []byte) error }

// batchBytes bounds the framed datagrams gathered into one tunnel write
// while more are waiting: enough to carry dozens of small datagrams per
// write in a burst, and a buffer held only while the burst lasts. A lone
// datagram, or one too large for a batch, is written on its own.
const batchBytes = 16 << 10

func toTunnel(tun PacketConn, sock Datagrams, max int, st *PacketStats) error {
	w, _ := sock.(waiter)
	fw, _ := tun.(framedWriter)
	for {
		if err := WaitReadable(sock); err != nil && !isTransient(err) {
			return err
		}
		frame := pool.Get(Headroom + max + 1)
		n, err := sock.ReadDatagram((*frame)[Headroom:])
		if err != nil {
			pool.Put(frame)
			if isTransient(err) {
				continue
			}
			return err
		}
		if n > max {
			pool.Put(frame)
			st.TooLarge.Add(1)
			continue
		}
		st.lastActive.Store(monotonic())
		if fw != nil && w != nil && Headroom+n <= batchBytes/2 && w.Waiting() {
			// A burst: send this datagram and those waiting behind it
			// in batches.
			batch := pool.Get(batchBytes)
			b := batcher{fw: fw, buf: (*batch)[:0], st: st}
			err = b.gather(w, sock, *frame, n, max)
			pool.Put(batch)
			pool.Put(frame)
			if err != nil {
				return err
			}
			continue
		}
		err = tun.WritePacket((*frame)[:Headroom+n])
		pool.Put(frame)
		if errors.Is(err, protocol.ErrDatagramTooLarge) {
			st.TooLarge.Add(1)
			continue
		}
		if err != nil {
			return err
		}
		st.ToTunnel.Add(1)
		st.BytesToTunnel.Add(int64(n))
	}
}

// batcher gathers framed datagrams into buf and sends them with one
// WriteFramed per full buffer.
type batcher struct {
	fw           framedWriter
	buf          []byte // framed datagrams not yet sent; capacity batchBytes
	count, bytes int64  // datagrams and payload bytes in buf
	st           *PacketStats
}

// gather sends the n-byte datagram in frame[Headroom:] and then every
// datagram waiting behind it, reading them into frame (which has room for
// the largest). It returns once none is waiting, with everything sent.
func (b *batcher) gather(w waiter, sock Datagrams, frame []byte, n, max int) error {
	for {
		if err := b.add(frame, n); err != nil {
			return err
		}
		var err error
		for {
			if !w.Waiting() {
				return b.flush()
			}
			n, err = sock.ReadDatagram(frame[Headroom:])
			if err == nil && n <= max {
				break
			}
			if err == nil {
				b.st.TooLarge.Add(1)
				continue
			}
			if isTransient(err) {
				continue
			}
			if ferr := b.flush(); ferr != nil {
				return ferr
			}
			return err
		}
		b.st.lastActive.Store(monotonic())
	}
}

// add appends the n-byte datagram in frame[Headroom:] to the batch,
// sending the batch first when it would not fit. A datagram larger than a
// whole batch is sent on its own, framed in place.
func (b *batcher) add(frame []byte, n int) error {
	f := framed(frame, n)
	if len(b.buf)+len(f) > cap(b.buf) {
		if err := b.flush(); err != nil {
			return err
		}
	}
	if len(f) > cap(b.buf) {
		if err := b.fw.WriteFramed(f); err != nil {
			return err
		}
		b.st.ToTunnel.Add(1)
		b.st.BytesToTunnel.Add(int64(n))
		return nil
	}
	b.buf = append(b.buf, f...)
	b.count++
	b.bytes += int64(n)
	return nil
}

// flush sends the batch, if any.
func (b *batcher) flush() error {
	if len(b.buf) == 0 {
		return nil
	}
	if err := b.fw.WriteFramed(b.buf); err != nil {
		return err
	}
	b.st.ToTunnel.Add(b.count)
	b.st.BytesToTunnel.Add(b.bytes)
	b.buf, b.count, b.bytes = b.buf[:0], 0, 0
	return nil
}

// framed writes the length prefix of the n-byte datagram in
// frame[Headroom:] and returns the framed datagram. n never exceeds
// protocol.MaxDatagram here (the session's maximum is capped to it).
func framed(frame []byte, n int) []byte {
	protocol.PutDatagramHeader(frame, n)
	return frame[:Headroom+n]
}

// maxUDPPayload bounds a datagram with its prefix: what one UDP datagram
// can carry at most, and the pool's 64 KiB class.
const maxUDPPayload = 64 << 10

func fromTunnel(tun PacketConn, sock Datagrams, max int, prefix []byte, st *PacketStats) error {
	p := len(prefix)
	size := max
	if p > 0 {
		size = min(p+max, maxUDPPayload)
	}
	for {
		if err := tun.WaitReadable(); err != nil {
			return err
		}
		buf := pool.Get(size)
		copy(*buf, prefix)
		n, err := tun.ReadPacket((*buf)[p:])
		if errors.Is(err, protocol.ErrDatagramTooLarge) {
			pool.Put(buf)
			st.TooLarge.Add(1)
			continue
		}
		if err != nil {
			pool.Put(buf)
			return err
		}
		st.lastActive.Store(monotonic())
		err = sock.WriteDatagram((*buf)[:p+n])
		pool.Put(buf)
		if err != nil && !isTransient(err) {
			return err
		}
		st.FromTunnel.Add(1)
		st.BytesFromTunnel.Add(int64(n))
	}
}

// isTransient reports errors a UDP socket returns for one datagram without
// being broken: a connected socket reports an ICMP port unreachable from
// an earlier send as ECONNREFUSED on a later call.
func isTransient(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EMSGSIZE) ||
		errors.Is(err, syscall.ENOBUFS)
}

// ConnectedUDP adapts a connected UDP socket (the agent's backend socket).
type ConnectedUDP struct{ *net.UDPConn }

// ReadDatagram implements Datagrams.
func (c ConnectedUDP) ReadDatagram(buf []byte) (int, error) { return c.UDPConn.Read(buf) }

// WaitReadable blocks until a datagram (or an error to report) is
// waiting on the socket, without consuming it.
func (c ConnectedUDP) WaitReadable() error {
	_, err := c.peek(true)
	return err
}

// Waiting reports whether a datagram (or an error to report) is waiting
// on the socket, without blocking and without consuming it.
func (c ConnectedUDP) Waiting() bool {
	ready, err := c.peek(false)
	return ready || err != nil
}

// peek asks the socket whether something is waiting to be read, parking
// until something is when wait is set. A pending socket error (an ICMP
// report from an earlier send) is returned as err. It allocates nothing,
// as it runs once or twice per datagram.
func (c ConnectedUDP) peek(wait bool) (ready bool, err error) {
	if !canPeek {
		// Nothing known to be waiting; a waiter goes on to the read,
		// which waits itself.
		return wait, nil
	}
	rc, err := c.UDPConn.SyscallConn()
	if err != nil {
		return false, err
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		e := peekByte(fd, &b[0])
		switch e {
		case 0:
			ready = true
		case syscall.EAGAIN, syscall.EINTR:
			return !wait // park until the poller says readable, or answer now
		default:
			perr = e
		}
		return true
	})
	if err != nil {
		return false, err
	}
	return ready, perr
}

// WriteDatagram implements Datagrams.
func (c ConnectedUDP) WriteDatagram(b []byte) error {
	_, err := c.UDPConn.Write(b)
	return err
}
