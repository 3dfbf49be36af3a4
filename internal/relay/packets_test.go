package relay

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// queuedDatagrams is a socket side with a fixed set of datagrams waiting,
// like a gateway session whose queue filled up during a burst.
type queuedDatagrams struct {
	mu     sync.Mutex
	queue  [][]byte
	closed chan struct{}
	once   sync.Once
}

func newQueuedDatagrams(d [][]byte) *queuedDatagrams {
	return &queuedDatagrams{queue: d, closed: make(chan struct{})}
}

func (q *queuedDatagrams) Waiting() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.queue) > 0
}

func (q *queuedDatagrams) WaitReadable() error {
	if q.Waiting() {
		return nil
	}
	<-q.closed
	return net.ErrClosed
}

func (q *queuedDatagrams) ReadDatagram(buf []byte) (int, error) {
	if err := q.WaitReadable(); err != nil {
		return 0, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.queue[0]
	q.queue = q.queue[1:]
	return copy(buf, d), nil // truncates, like a socket
}

func (q *queuedDatagrams) WriteDatagram([]byte) error { return nil }

func (q *queuedDatagrams) Close() error {
	q.once.Do(func() { close(q.closed) })
	return nil
}

// recordingTunnel is a yamux-mode tunnel side that records what is written
// to the stream, and the size of each write.
type recordingTunnel struct {
	mu     sync.Mutex
	stream bytes.Buffer
	writes []int
	closed chan struct{}
	once   sync.Once
}

func newRecordingTunnel() *recordingTunnel { return &recordingTunnel{closed: make(chan struct{})} }

func (r *recordingTunnel) WriteFramed(frames []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stream.Write(frames)
	r.writes = append(r.writes, len(frames))
	return nil
}

func (r *recordingTunnel) WritePacket(frame []byte) error {
	if err := protocol.PutDatagramHeader(frame, len(frame)-Headroom); err != nil {
		return err
	}
	return r.WriteFramed(frame)
}

func (r *recordingTunnel) ReadPacket([]byte) (int, error) {
	<-r.closed
	return 0, io.EOF
}

func (r *recordingTunnel) WaitReadable() error {
	<-r.closed
	return io.EOF
}

func (r *recordingTunnel) Close() error {
	r.once.Do(func() { close(r.closed) })
	return nil
}

// A burst of waiting datagrams goes into the tunnel in batches: every
// datagram arrives whole and in order, oversized ones are dropped and
// counted, and there are far fewer writes than datagrams.
func TestBurstIsBatchedIntact(t *testing.T) {
	const max = 9000
	var sent, want [][]byte
	for i := range 3000 {
		size := i % 300 // small ones, zero length included
		switch i % 500 {
		case 7:
			size = batchBytes/2 + 1 // too large to start a batch
		case 11:
			size = max // larger than a batch's remaining room
		case 13:
			size = max + 1 // over the session's maximum: dropped
		}
		d := make([]byte, size)
		for j := range d {
			d[j] = byte(i + j)
		}
		sent = append(sent, d)
		if size <= max {
			want = append(want, d)
		}
	}
	sock := newQueuedDatagrams(sent)
	tun := newRecordingTunnel()
	var st PacketStats
	done := make(chan Result, 1)
	go func() { done <- PipePackets(tun, sock, PacketOptions{MaxDatagram: max}, &st) }()

	deadline := time.Now().Add(10 * time.Second)
	for st.ToTunnel.Load()+st.TooLarge.Load() < int64(len(sent)) {
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: %d sent into the tunnel, %d dropped, of %d", st.ToTunnel.Load(), st.TooLarge.Load(), len(sent))
		}
		time.Sleep(time.Millisecond)
	}
	sock.Close()
	if res := <-done; res.Err != nil {
		t.Fatalf("PipePackets: %v", res.Err)
	}

	if got, wantN := st.ToTunnel.Load(), int64(len(want)); got != wantN {
		t.Errorf("ToTunnel = %d, want %d", got, wantN)
	}
	if got, wantN := st.TooLarge.Load(), int64(len(sent)-len(want)); got != wantN {
		t.Errorf("TooLarge = %d, want %d", got, wantN)
	}
	var bytesWant int64
	for _, d := range want {
		bytesWant += int64(len(d))
	}
	if got := st.BytesToTunnel.Load(); got != bytesWant {
		t.Errorf("BytesToTunnel = %d, want %d", got, bytesWant)
	}

	r := bytes.NewReader(tun.stream.Bytes())
	buf := make([]byte, protocol.MaxDatagram)
	for i, d := range want {
		n, err := protocol.ReadDatagram(r, buf)
		if err != nil {
			t.Fatalf("datagram %d of %d: %v", i, len(want), err)
		}
		if !bytes.Equal(buf[:n], d) {
			t.Fatalf("datagram %d: got %d bytes, want %d (contents differ: %v)", i, n, len(d), n == len(d))
		}
	}
	if r.Len() != 0 {
		t.Errorf("%d bytes left on the stream after the last datagram", r.Len())
	}
	for i, n := range tun.writes {
		if n > batchBytes && n != Headroom+max {
			t.Errorf("write %d is %d bytes: above the %d-byte batch, and not one large datagram", i, n, batchBytes)
		}
	}
	if len(tun.writes) > len(want)/10 {
		t.Errorf("%d writes for %d waiting datagrams: the burst was not batched", len(tun.writes), len(want))
	}
	t.Logf("%d datagrams in %d writes", len(want), len(tun.writes))
}

// udpPair returns a socket on loopback (a, the backend) and a socket
// connected to it (b, the agent's side), closed when the test ends.
func udpPair(t *testing.T) (a, b *net.UDPConn) {
	t.Helper()
	a, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b, err = net.DialUDP("udp", nil, a.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return a, b
}

// Waiting on a real UDP socket answers without blocking and without
// consuming the datagram.
func TestConnectedUDPWaiting(t *testing.T) {
	a, b := udpPair(t)
	if _, err := a.WriteToUDP([]byte("x"), b.LocalAddr().(*net.UDPAddr)); err != nil {
		t.Fatal(err)
	}
	// The first probe of an empty socket says no; once the datagram has
	// arrived (on loopback, at once), it says yes and leaves it there.
	c := ConnectedUDP{UDPConn: b}
	deadline := time.Now().Add(5 * time.Second)
	for !c.Waiting() {
		if time.Now().After(deadline) {
			t.Fatal("a sent datagram never showed as waiting")
		}
		time.Sleep(time.Millisecond)
	}
	if !c.Waiting() {
		t.Fatal("Waiting consumed the datagram")
	}
	buf := make([]byte, 16)
	b.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.ReadDatagram(buf)
	if err != nil || string(buf[:n]) != "x" {
		t.Fatalf("ReadDatagram = %q, %v", buf[:n], err)
	}
	if c.Waiting() {
		t.Fatal("Waiting with nothing left on the socket")
	}
	// A closed socket has an error to report: Waiting says so, so that the
	// reader meets it instead of waiting.
	b.Close()
	if !c.Waiting() {
		t.Fatal("Waiting on a closed socket said nothing is waiting")
	}
	if _, err := c.ReadDatagram(buf); err == nil {
		t.Fatal("ReadDatagram on a closed socket succeeded")
	}
}

// The agent's side of a UDP session allocates nothing per datagram: wait,
// check for more, read, write.
func TestConnectedUDPAllocatesNothing(t *testing.T) {
	a, b := udpPair(t)
	a.SetReadBuffer(1 << 20)
	b.SetReadBuffer(1 << 20)
	c := ConnectedUDP{UDPConn: b}
	var sock Datagrams = c
	msg, buf := []byte("datagram"), make([]byte, 64)
	const runs = 200
	for range runs + 1 { // AllocsPerRun runs once more to warm up
		if _, err := a.WriteToUDP(msg, b.LocalAddr().(*net.UDPAddr)); err != nil {
			t.Fatal(err)
		}
	}
	b.SetReadDeadline(time.Now().Add(10 * time.Second))
	allocs := testing.AllocsPerRun(runs, func() {
		if err := WaitReadable(sock); err != nil {
			t.Fatal(err)
		}
		if _, err := sock.ReadDatagram(buf); err != nil {
			t.Fatal(err)
		}
		c.Waiting()
		if err := sock.WriteDatagram(msg); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per datagram, want 0", allocs)
	}
}

// dropTunnel is a tunnel side that has dropped queueFull datagrams on
// arrival (as a JSON-mode stream does when its queue is full) and hands
// the relay one datagram too large for the session.
type dropTunnel struct {
	*recordingTunnel
	queueFull uint64
	mu        sync.Mutex
	oversized bool // the too-large datagram was read
}

func (d *dropTunnel) Dropped() uint64 { return d.queueFull }

func (d *dropTunnel) WaitReadable() error {
	d.mu.Lock()
	pending := !d.oversized
	d.mu.Unlock()
	if pending {
		return nil
	}
	return d.recordingTunnel.WaitReadable()
}

func (d *dropTunnel) ReadPacket(buf []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.oversized {
		d.oversized = true
		return 0, protocol.ErrDatagramTooLarge
	}
	return 0, io.EOF
}

// The relay returns what a UDP session dropped, by reason: datagrams too
// large either way, and those the tunnel side dropped on arrival.
func TestPipePacketsReturnsDrops(t *testing.T) {
	const max = 100
	sock := newQueuedDatagrams([][]byte{make([]byte, max+1), make([]byte, max), make([]byte, max+50)})
	tun := &dropTunnel{recordingTunnel: newRecordingTunnel(), queueFull: 7}
	var st PacketStats
	done := make(chan Result, 1)
	go func() { done <- PipePackets(tun, sock, PacketOptions{MaxDatagram: max}, &st) }()
	deadline := time.Now().Add(10 * time.Second)
	for st.ToTunnel.Load() < 1 || st.TooLarge.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s: %d sent, %d too large", st.ToTunnel.Load(), st.TooLarge.Load())
		}
		time.Sleep(time.Millisecond)
	}
	sock.Close()
	var res Result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("PipePackets did not return after the socket closed")
	}
	if res.Err != nil || res.TooLarge != 3 || res.QueueFull != 7 {
		t.Fatalf("result %+v, want no error, 3 too large, 7 queue full", res)
	}
}

// A UDP session without traffic ends with ErrIdle.
func TestPipePacketsIdle(t *testing.T) {
	sock := newQueuedDatagrams(nil)
	tun := newRecordingTunnel()
	done := make(chan Result, 1)
	go func() { done <- PipePackets(tun, sock, PacketOptions{IdleTimeout: 50 * time.Millisecond}, nil) }()
	select {
	case res := <-done:
		if res.Err != ErrIdle {
			t.Fatalf("result %+v, want ErrIdle", res)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("idle session not ended")
	}
}
