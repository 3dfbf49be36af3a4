package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
)

// JSON mode carries streams as text messages: tcp_open/udp_open,
// *_open_result, *_data (base64), *_close (with half-close) and credit.
//
// Flow control: each side may have at most StreamWindow bytes of a TCP
// stream's data outstanding; the receiver sends credit as the application
// consumes data. A peer that sends beyond its credit breaks the protocol and
// loses the session. UDP data is not flow controlled, like UDP itself: each
// UDP stream queues at most StreamWindow bytes and udpQueueLen datagrams, and
// drops (and counts) the rest.
//
// The read loop handles every message in order, in place, with no goroutine
// per message; data waits in the stream's queue until the application reads
// it, so data that arrives before the backend dial completes is kept.

const udpQueueLen = 1024

// ErrStreamReset is returned by reads and writes on a stream the peer aborted.
var ErrStreamReset = errors.New("tunnel: stream reset by peer")

type jsonMux struct {
	s       *Session
	window  int
	maxData int // payload per tcp_data message
	// maxPacket is the largest datagram a udp_data message can carry.
	maxPacket int

	mu      sync.Mutex
	streams map[uint32]*jsonStream
	nextID  uint32
	err     error // set once the session ended

	acceptQ chan *Incoming
}

func newJSONMux(s *Session) *jsonMux {
	return &jsonMux{
		s:         s,
		window:    s.hello.StreamWindow,
		maxData:   min(protocol.MaxDataPayload(s.hello.MaxMessageSize), 32<<10),
		maxPacket: min(protocol.MaxDataPayload(s.hello.MaxMessageSize), protocol.MaxDatagram),
		streams:   make(map[uint32]*jsonStream),
		acceptQ:   make(chan *Incoming, 1024),
	}
}

type chunk struct {
	buf *[]byte
	off int
}

// chunkQueue is a stream's FIFO of received data. It reuses its backing
// array, so a steady flow of data messages allocates nothing; a drained
// queue keeps at most keptChunks slots, so an idle stream holds little.
type chunkQueue struct {
	items []chunk
	head  int
}

const keptChunks = 16

func (q *chunkQueue) len() int { return len(q.items) - q.head }

// front returns the oldest chunk; the queue must not be empty.
func (q *chunkQueue) front() *chunk { return &q.items[q.head] }

func (q *chunkQueue) push(c chunk) {
	if q.head > 0 && len(q.items) == cap(q.items) {
		// Full at the back with room at the front: move the live part down.
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	q.items = append(q.items, c)
}

// pop removes and returns the oldest chunk; the queue must not be empty.
func (q *chunkQueue) pop() chunk {
	c := q.items[q.head]
	q.items[q.head] = chunk{}
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
		if cap(q.items) > keptChunks {
			q.items = nil
		}
	}
	return c
}

type jsonStream struct {
	m    *jsonMux
	id   uint32
	kind protocol.Kind

	readable chan struct{} // cap 1: data, EOF or error arrived
	writable chan struct{} // cap 1: credit arrived or the stream failed
	openDone chan struct{} // closed once the open result is known

	mu       sync.Mutex
	chunks   chunkQueue
	buffered int // bytes queued in chunks
	unacked  int // bytes received and not yet credited back
	consumed int // bytes read since the last credit message
	eof      bool
	rerr     error
	credit   int
	wclosed  bool
	werr     error
	openErr  error
	closed   bool
	dropped  uint64 // UDP datagrams dropped on arrival
}

func (m *jsonMux) newStream(id uint32, kind protocol.Kind) *jsonStream {
	return &jsonStream{
		m: m, id: id, kind: kind, credit: m.window,
		readable: make(chan struct{}, 1),
		writable: make(chan struct{}, 1),
		openDone: make(chan struct{}),
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// jsonReadLoop is the session's only reader in JSON mode.
func (s *Session) jsonReadLoop() {
	err := s.jsonReadLoopErr()
	s.c.fail(err)
	s.jm.closeAll(s.c.Err())
}

func (s *Session) jsonReadLoopErr() error {
	m := s.jm
	for {
		typ, b, err := s.c.readMessage()
		if err != nil {
			return fmt.Errorf("tunnel: read: %w", err)
		}
		if typ != websocket.TextMessage {
			return fmt.Errorf("%w: binary message in json mode", ErrProtocol)
		}
		if kind, id, enc, ok := protocol.ParseDataFast(b); ok {
			buf := pool.Get(len(enc) / 4 * 3)
			n, err := protocol.DecodePayload(*buf, enc)
			if err != nil {
				pool.Put(buf)
				return fmt.Errorf("%w: %s: %w", ErrProtocol, protocol.TypeTCPData, err)
			}
			*buf = (*buf)[:n]
			if err := m.onData(kind, id, buf); err != nil {
				return err
			}
			continue
		}
		if id, n, ok := protocol.ParseCreditFast(b); ok {
			if err := m.onCredit(id, n); err != nil {
				return err
			}
			continue
		}
		msg, err := protocol.Decode(b)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		switch msg := msg.(type) {
		case *protocol.Data:
			buf := pool.Get(len(msg.Data))
			copy(*buf, msg.Data)
			err = m.onData(msg.Kind, msg.ID, buf)
		case *protocol.Open:
			err = m.onOpen(msg)
		case *protocol.OpenResult:
			err = m.onOpenResult(msg)
		case *protocol.Close:
			err = m.onClose(msg)
		case *protocol.Credit:
			err = m.onCredit(msg.ID, msg.Bytes)
		default:
			err = s.handleControl(msg)
		}
		if err != nil {
			return err
		}
	}
}

func (m *jsonMux) lookup(id uint32) *jsonStream {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.streams[id]
}

func (m *jsonMux) remove(st *jsonStream) {
	m.mu.Lock()
	if m.streams[st.id] == st {
		delete(m.streams, st.id)
	}
	m.mu.Unlock()
}

func (m *jsonMux) onData(kind protocol.Kind, id uint32, buf *[]byte) error {
	st := m.lookup(id)
	if st == nil {
		// Late data for a stream this side already closed.
		pool.Put(buf)
		return nil
	}
	if st.kind != kind {
		pool.Put(buf)
		return fmt.Errorf("%w: %s data on a %s stream", ErrProtocol, kind, st.kind)
	}
	n := len(*buf)
	if n == 0 && kind == protocol.KindTCP {
		pool.Put(buf) // an empty tcp_data carries nothing
		return nil
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case st.closed || st.rerr != nil:
		pool.Put(buf)
		return nil
	case st.eof:
		pool.Put(buf)
		return fmt.Errorf("%w: data after close on stream %d", ErrProtocol, id)
	case kind == protocol.KindUDP:
		if st.buffered+n > m.window || st.chunks.len() >= udpQueueLen {
			st.dropped++
			pool.Put(buf)
			return nil
		}
	default:
		if st.unacked+n > m.window {
			pool.Put(buf)
			return fmt.Errorf("%w: stream %d sent %d bytes beyond its credit", ErrProtocol, id, st.unacked+n-m.window)
		}
		st.unacked += n
	}
	st.chunks.push(chunk{buf: buf})
	st.buffered += n
	signal(st.readable)
	return nil
}

func (m *jsonMux) onOpen(o *protocol.Open) error {
	if m.s.gateway {
		return fmt.Errorf("%w: %s sent to the gateway", ErrProtocol, o.Type())
	}
	var client netip.AddrPort
	if o.Client != "" {
		client, _ = netip.ParseAddrPort(o.Client) // validated by Decode
	}
	h := protocol.StreamHeader{Kind: o.Kind, Service: o.Service, Client: client}
	m.mu.Lock()
	if _, dup := m.streams[o.ID]; dup {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s reuses open stream id %d", ErrProtocol, o.Type(), o.ID)
	}
	if m.err != nil {
		m.mu.Unlock()
		return m.err
	}
	if len(m.streams) >= m.s.cfg.MaxStreams {
		m.mu.Unlock()
		return m.sendResult(o.Kind, o.ID, protocol.StatusOverLimit, true)
	}
	st := m.newStream(o.ID, o.Kind)
	close(st.openDone)
	m.streams[o.ID] = st
	m.mu.Unlock()

	in := &Incoming{
		readHeader: func() (protocol.StreamHeader, error) { return h, nil },
		reply: func(status protocol.Status) (Stream, error) {
			if err := m.sendResult(st.kind, st.id, status, false); err != nil {
				st.Reset()
				return nil, err
			}
			if status != protocol.StatusOK {
				st.discard()
				return nil, nil
			}
			return st, nil
		},
	}
	select {
	case m.acceptQ <- in:
		return nil
	default:
		st.discard()
		return m.sendResult(o.Kind, o.ID, protocol.StatusOverLimit, true)
	}
}

// sendResult sends an open result. Results sent from the read loop go on the
// control queue: the read loop must never wait behind data.
func (m *jsonMux) sendResult(kind protocol.Kind, id uint32, status protocol.Status, control bool) error {
	b, err := protocol.Encode(&protocol.OpenResult{Kind: kind, ID: id, Status: status})
	if err != nil {
		return err
	}
	return m.s.c.sendCopy(websocket.TextMessage, b, control)
}

func (m *jsonMux) onOpenResult(r *protocol.OpenResult) error {
	if !m.s.gateway {
		return fmt.Errorf("%w: %s sent to the agent", ErrProtocol, r.Type())
	}
	st := m.lookup(r.ID)
	if st == nil {
		return nil // the client went away meanwhile
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	select {
	case <-st.openDone:
		return fmt.Errorf("%w: second %s for stream %d", ErrProtocol, r.Type(), r.ID)
	default:
	}
	if r.Status != protocol.StatusOK {
		st.openErr = &protocol.OpenError{Status: r.Status}
		st.rerr, st.werr = st.openErr, st.openErr
		m.remove(st)
		signal(st.writable)
	}
	close(st.openDone)
	signal(st.readable)
	return nil
}

func (m *jsonMux) onClose(c *protocol.Close) error {
	st := m.lookup(c.ID)
	if st == nil {
		return nil
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	switch {
	case c.Half && st.kind == protocol.KindTCP:
		st.eof = true
		if st.wclosed {
			m.remove(st)
		}
	case st.kind == protocol.KindUDP:
		// The normal end of a UDP session: reads drain the queue, then EOF.
		st.eof = true
		m.remove(st)
	default:
		st.fail(ErrStreamReset)
		m.remove(st)
	}
	signal(st.readable)
	return nil
}

func (m *jsonMux) onCredit(id, bytes uint32) error {
	st := m.lookup(id)
	if st == nil {
		return nil
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.kind != protocol.KindTCP {
		return fmt.Errorf("%w: credit for udp stream %d", ErrProtocol, id)
	}
	// Add in 64 bits: where int has 32, a credit near 1<<32 would wrap
	// negative, pass the window check and make the next Write panic.
	if int64(st.credit)+int64(bytes) > int64(m.window) {
		return fmt.Errorf("%w: credit for stream %d exceeds the window", ErrProtocol, id)
	}
	st.credit += int(bytes)
	signal(st.writable)
	return nil
}

// closeAll fails every stream once the session has ended.
func (m *jsonMux) closeAll(err error) {
	m.mu.Lock()
	m.err = err
	streams := m.streams
	m.streams = map[uint32]*jsonStream{}
	m.mu.Unlock()
	for _, st := range streams {
		st.mu.Lock()
		st.fail(err)
		st.mu.Unlock()
	}
}

func (m *jsonMux) open(ctx context.Context, h protocol.StreamHeader) (Stream, error) {
	if err := protocol.ValidateServiceID(h.Service); err != nil {
		return nil, err
	}
	m.mu.Lock()
	if m.err != nil {
		m.mu.Unlock()
		return nil, m.err
	}
	if len(m.streams) >= m.s.cfg.MaxStreams {
		m.mu.Unlock()
		return nil, errors.New("tunnel: too many open streams")
	}
	for {
		m.nextID++
		if m.nextID == 0 {
			continue
		}
		if _, used := m.streams[m.nextID]; !used {
			break
		}
	}
	st := m.newStream(m.nextID, h.Kind)
	m.streams[st.id] = st
	m.mu.Unlock()

	o := &protocol.Open{Kind: h.Kind, ID: st.id, Service: h.Service}
	if h.Client.IsValid() {
		o.Client = h.Client.String()
	}
	b, err := protocol.Encode(o)
	if err == nil {
		err = m.s.c.sendCopy(websocket.TextMessage, b, false)
	}
	if err != nil {
		m.remove(st)
		return nil, fmt.Errorf("tunnel: open stream: %w", err)
	}
	return st, nil
}

func (m *jsonMux) accept(ctx context.Context) (*Incoming, error) {
	select {
	case in := <-m.acceptQ:
		return in, nil
	case <-m.s.c.done:
		return nil, m.s.c.Err()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// fail ends both directions with err. Caller holds st.mu.
func (st *jsonStream) fail(err error) {
	if st.rerr == nil {
		st.rerr = err
	}
	if st.werr == nil {
		st.werr = err
	}
	select {
	case <-st.openDone:
	default:
		if st.openErr == nil {
			st.openErr = err
		}
		close(st.openDone)
	}
	signal(st.readable)
	signal(st.writable)
}

func (st *jsonStream) waitOpen(ctx context.Context) error {
	select {
	case <-st.openDone:
	case <-ctx.Done():
		return ctx.Err()
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.openErr
}

func (st *jsonStream) Read(p []byte) (int, error) {
	for {
		st.mu.Lock()
		if st.openErr != nil {
			err := st.openErr
			st.mu.Unlock()
			return 0, err
		}
		if st.chunks.len() > 0 {
			if len(p) == 0 {
				st.mu.Unlock()
				return 0, nil
			}
			n := st.take(p)
			credit := 0
			if st.consumed >= st.m.window/4 || (st.buffered == 0 && st.consumed >= st.m.window/16) {
				credit, st.consumed = st.consumed, 0
				st.unacked -= credit
			}
			st.mu.Unlock()
			if credit > 0 {
				st.sendCredit(credit)
			}
			return n, nil
		}
		if st.rerr != nil {
			err := st.rerr
			st.mu.Unlock()
			return 0, err
		}
		if st.eof {
			st.mu.Unlock()
			return 0, io.EOF
		}
		st.mu.Unlock()
		st.waitReadable()
	}
}

// waitReadable blocks until the stream may have changed state.
func (st *jsonStream) waitReadable() {
	select {
	case <-st.readable:
	case <-st.m.s.c.done:
		// The read loop fails every stream as it exits; don't spin
		// waiting for it.
		st.mu.Lock()
		st.fail(st.m.s.c.Err())
		st.mu.Unlock()
	}
}

// take copies queued data into p. Caller holds st.mu.
func (st *jsonStream) take(p []byte) int {
	n := 0
	for n < len(p) && st.chunks.len() > 0 {
		c := st.chunks.front()
		k := copy(p[n:], (*c.buf)[c.off:])
		n += k
		c.off += k
		if c.off == len(*c.buf) {
			pool.Put(st.chunks.pop().buf)
		}
	}
	st.buffered -= n
	st.consumed += n
	return n
}

func (st *jsonStream) sendCredit(n int) {
	buf := pool.Get(protocol.CreditLen)
	*buf = protocol.AppendCredit((*buf)[:0], st.id, uint32(n))
	_ = st.m.s.c.send(outMsg{typ: websocket.TextMessage, buf: buf}, true)
}

func (st *jsonStream) Write(p []byte) (int, error) {
	if st.kind != protocol.KindTCP {
		return 0, errors.New("tunnel: Write on a udp stream: use WritePacket")
	}
	total := 0
	for total < len(p) {
		st.mu.Lock()
		for st.credit == 0 && st.werr == nil && !st.wclosed {
			st.mu.Unlock()
			select {
			case <-st.writable:
			case <-st.m.s.c.done:
				return total, st.m.s.c.Err()
			}
			st.mu.Lock()
		}
		if st.werr != nil {
			err := st.werr
			st.mu.Unlock()
			return total, err
		}
		if st.wclosed {
			st.mu.Unlock()
			return total, errors.New("tunnel: write after CloseWrite")
		}
		n := min(st.credit, st.m.maxData, len(p)-total)
		st.credit -= n
		st.mu.Unlock()
		if err := st.sendData(p[total : total+n]); err != nil {
			return total, err
		}
		total += n
	}
	return total, nil
}

func (st *jsonStream) sendData(p []byte) error {
	buf := pool.Get(protocol.DataOverhead + (len(p)+2)/3*4)
	*buf = protocol.AppendData((*buf)[:0], st.kind, st.id, p)
	return st.m.s.c.send(outMsg{typ: websocket.TextMessage, buf: buf}, false)
}

// WaitReadable blocks until data, the end of the stream or an error.
func (st *jsonStream) WaitReadable() error {
	_, err := st.Read(nil)
	return err
}

// WritePacket sends one datagram as one udp_data message.
func (st *jsonStream) WritePacket(frame []byte) error {
	p := frame[PacketHeadroom:]
	if len(p) > st.m.maxPacket {
		return fmt.Errorf("%w: %d bytes exceed the tunnel's max_message_size", protocol.ErrDatagramTooLarge, len(p))
	}
	st.mu.Lock()
	err := st.werr
	st.mu.Unlock()
	if err != nil {
		return err
	}
	return st.sendData(p)
}

// ReadPacket returns the next queued datagram.
func (st *jsonStream) ReadPacket(buf []byte) (int, error) {
	for {
		st.mu.Lock()
		if st.openErr != nil {
			err := st.openErr
			st.mu.Unlock()
			return 0, err
		}
		if st.chunks.len() > 0 {
			c := st.chunks.pop()
			n := len(*c.buf)
			st.buffered -= n
			st.mu.Unlock()
			defer pool.Put(c.buf)
			if n > len(buf) {
				return 0, fmt.Errorf("%w: %d > %d bytes", protocol.ErrDatagramTooLarge, n, len(buf))
			}
			return copy(buf, *c.buf), nil
		}
		if st.rerr != nil {
			err := st.rerr
			st.mu.Unlock()
			return 0, err
		}
		if st.eof {
			st.mu.Unlock()
			return 0, io.EOF
		}
		st.mu.Unlock()
		st.waitReadable()
	}
}

// Dropped returns how many datagrams arrived while the queue was full.
func (st *jsonStream) Dropped() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.dropped
}

func (st *jsonStream) CloseWrite() error {
	st.mu.Lock()
	if st.wclosed || st.werr != nil {
		st.mu.Unlock()
		return nil
	}
	st.wclosed = true
	if st.eof {
		st.m.remove(st)
	}
	st.mu.Unlock()
	return st.sendClose(true)
}

func (st *jsonStream) sendClose(half bool) error {
	b, err := protocol.Encode(&protocol.Close{Kind: st.kind, ID: st.id, Half: half})
	if err != nil {
		return err
	}
	return st.m.s.c.sendCopy(websocket.TextMessage, b, false)
}

// Close releases the stream: cleanly if both directions have ended,
// otherwise by aborting it.
func (st *jsonStream) Close() error {
	st.mu.Lock()
	clean := st.wclosed && st.eof
	st.mu.Unlock()
	if clean {
		st.discard()
		return nil
	}
	return st.Reset()
}

// Reset aborts the stream and tells the peer.
func (st *jsonStream) Reset() error {
	st.mu.Lock()
	notify := !st.closed && st.rerr == nil
	st.mu.Unlock()
	st.discard()
	if notify {
		return st.sendClose(false)
	}
	return nil
}

// discard forgets the stream locally and frees its queue.
func (st *jsonStream) discard() {
	st.m.remove(st)
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return
	}
	st.closed = true
	for st.chunks.len() > 0 {
		pool.Put(st.chunks.pop().buf)
	}
	st.chunks = chunkQueue{}
	st.buffered = 0
	st.fail(errStreamClosed)
}

// errStreamClosed is returned by a stream's methods after Close.
var errStreamClosed = errors.New("tunnel: use of closed stream")
