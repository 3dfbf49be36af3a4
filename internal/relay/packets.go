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
	// Dropped counts datagrams larger than the session's maximum.
	Dropped    atomic.Int64
	lastActive atomic.Int64
}

// PacketOptions tune a UDP session.
type PacketOptions struct {
	// MaxDatagram is the largest datagram passed whole; larger ones are
	// dropped and counted, never truncated.
	MaxDatagram int
	// IdleTimeout ends the session after this long without a datagram in
	// either direction (udp.session_timeout); 0 disables it.
	IdleTimeout time.Duration
}

// PipePackets relays datagrams between the tunnel and the socket side until
// either ends or the session idles out, then closes both.
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
		idled   atomic.Bool
		closeUp = func(err error) {
			errMu.Lock()
			if first == nil {
				first = err
			}
			errMu.Unlock()
			once.Do(func() { tun.Close(); sock.Close() })
		}
	)
	stopIdle := watchIdle(opt.IdleTimeout, &st.lastActive, func() {
		idled.Store(true)
		closeUp(ErrIdle)
	})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		closeUp(toTunnel(tun, sock, opt.MaxDatagram, st))
	}()
	closeUp(fromTunnel(tun, sock, opt.MaxDatagram, st))
	wg.Wait()
	stopIdle()
	res := Result{IdleTimeout: idled.Load()}
	errMu.Lock()
	if first != io.EOF && !isClosed(first) {
		res.Err = first
	}
	if idled.Load() {
		res.Err = ErrIdle
	}
	errMu.Unlock()
	return res
}

func toTunnel(tun PacketConn, sock Datagrams, max int, st *PacketStats) error {
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
			st.Dropped.Add(1)
			continue
		}
		st.lastActive.Store(monotonic())
		err = tun.WritePacket((*frame)[:Headroom+n])
		pool.Put(frame)
		if errors.Is(err, protocol.ErrDatagramTooLarge) {
			st.Dropped.Add(1)
			continue
		}
		if err != nil {
			return err
		}
		st.ToTunnel.Add(1)
		st.BytesToTunnel.Add(int64(n))
	}
}

func fromTunnel(tun PacketConn, sock Datagrams, max int, st *PacketStats) error {
	for {
		if err := tun.WaitReadable(); err != nil {
			return err
		}
		buf := pool.Get(max)
		n, err := tun.ReadPacket(*buf)
		if errors.Is(err, protocol.ErrDatagramTooLarge) {
			pool.Put(buf)
			st.Dropped.Add(1)
			continue
		}
		if err != nil {
			pool.Put(buf)
			return err
		}
		st.lastActive.Store(monotonic())
		err = sock.WriteDatagram((*buf)[:n])
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

// WriteDatagram implements Datagrams.
func (c ConnectedUDP) WriteDatagram(b []byte) error {
	_, err := c.UDPConn.Write(b)
	return err
}
