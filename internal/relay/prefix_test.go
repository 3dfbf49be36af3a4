package relay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/portway/portway/internal/protocol"
)

// queueTunnel hands the relay the datagrams in q, then io.EOF.
type queueTunnel struct {
	mu sync.Mutex
	q  [][]byte
}

func (t *queueTunnel) WaitReadable() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.q) == 0 {
		return io.EOF
	}
	return nil
}

func (t *queueTunnel) ReadPacket(buf []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	d := t.q[0]
	t.q = t.q[1:]
	if len(d) > len(buf) {
		return 0, protocol.ErrDatagramTooLarge
	}
	return copy(buf, d), nil
}

func (t *queueTunnel) WritePacket([]byte) error { return nil }
func (t *queueTunnel) Close() error             { return nil }

// sockRecorder records the datagrams written to the socket side.
type sockRecorder struct{ got [][]byte }

func (s *sockRecorder) ReadDatagram([]byte) (int, error) { return 0, net.ErrClosed }
func (s *sockRecorder) WriteDatagram(b []byte) error {
	s.got = append(s.got, bytes.Clone(b))
	return nil
}
func (s *sockRecorder) Close() error { return nil }

// The prefix (a PROXY protocol header) starts every datagram written to
// the socket side, the payload whole after it; a datagram that would no
// longer fit one UDP datagram with it is dropped and counted.
func TestPrefixEveryDatagram(t *testing.T) {
	prefix := []byte("HDR:")
	big := bytes.Repeat([]byte{'x'}, protocol.MaxDatagram)
	tun := &queueTunnel{q: [][]byte{[]byte("one"), {}, big, []byte("three")}}
	sock := &sockRecorder{}
	var st PacketStats
	err := fromTunnel(tun, sock, protocol.MaxDatagram, prefix, &st)
	if !errors.Is(err, io.EOF) {
		t.Fatalf("fromTunnel: %v", err)
	}
	want := []string{"HDR:one", "HDR:", "HDR:three"}
	if len(sock.got) != len(want) {
		t.Fatalf("wrote %d datagrams, want %d", len(sock.got), len(want))
	}
	for i, w := range want {
		if string(sock.got[i]) != w {
			t.Errorf("datagram %d = %q, want %q", i, sock.got[i], w)
		}
	}
	if n := st.TooLarge.Load(); n != 1 {
		t.Errorf("%d too large, want 1", n)
	}
}

// The prefix costs no allocation per datagram.
func TestPrefixAllocatesNothing(t *testing.T) {
	prefix := []byte("HDR:")
	msg := []byte("datagram")
	sock := discardSock{}
	const runs = 200
	tun, backing := &queueTunnel{}, [][]byte{msg}
	st := new(PacketStats)
	allocs := testing.AllocsPerRun(runs, func() {
		tun.q = backing[:1]
		fromTunnel(tun, sock, protocol.MaxDatagram, prefix, st)
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per datagram, want 0", allocs)
	}
}

type discardSock struct{}

func (discardSock) ReadDatagram([]byte) (int, error) { return 0, net.ErrClosed }
func (discardSock) WriteDatagram([]byte) error       { return nil }
func (discardSock) Close() error                     { return nil }
