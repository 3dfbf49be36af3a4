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

// jsonMux is the JSON mode. It owns its side of the stream protocol: the
// role (the gateway opens streams, the agent accepts them), the limits from
// the hello and the session's config, and the socket's reader, which
// handles every message in order; it writes through the session's wsConn.
type jsonMux struct {
	c         *wsConn
	role      role
	onControl controlHandler

	window     int // a stream's credit window, and a UDP stream's queue bound
	maxStreams int
	maxData    int // payload per tcp_data message
	// maxPacket is the largest datagram a udp_data message can carry.
	maxPacket int

	mu      sync.Mutex
	streams map[uint32]*jsonStream
	nextID  uint32
	err     error // set once the session ended

	acceptQ chan *Incoming
}

// newJSONMux starts the JSON mode on c with the limits of hello: it starts
// the reader, which passes control messages to onControl.
func newJSONMux(c *wsConn, r role, hello *protocol.Hello, maxStreams int, onControl controlHandler) *jsonMux {
	m := &jsonMux{
		c:          c,
		role:       r,
		onControl:  onControl,
		window:     hello.StreamWindow,
		maxStreams: maxStreams,
		maxData:    min(protocol.MaxDataPayload(hello.MaxMessageSize), 32<<10),
		maxPacket:  min(protocol.MaxDataPayload(hello.MaxMessageSize), protocol.MaxDatagram),
		streams:    make(map[uint32]*jsonStream),
		acceptQ:    make(chan *Incoming, 1024),
	}
	go m.run()
	return m
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

// streamState is where a JSON-mode stream is in its life. Each direction
// ends on its own (half-close); an error or a local Close ends both at once.
//
//	stateOpen ──CloseWrite──▶ stateWriteClosed ──peer's half close──▶ stateClosed
//	    └──peer's half close─▶ stateReadClosed ──CloseWrite─────────┘
//	any of these ──peer's reset, session end, local Close──▶ stateReset
//	an unanswered gateway stream ──refusal, or any error──▶ stateRefused
//
// A UDP stream has no half-close: the peer's udp_close ends its reading
// like a half close, and it leaves the mux at once.
type streamState uint8

const (
	// stateOpen: both directions carry data. A gateway stream is in it
	// from the start, before the agent's answer, so that the client's
	// first bytes travel right behind the open.
	stateOpen streamState = iota
	// stateWriteClosed: this side has sent its half close; reading goes on.
	stateWriteClosed
	// stateReadClosed: the peer has finished sending; reads drain the
	// queue, then return io.EOF. Writing goes on.
	stateReadClosed
	// stateClosed: both directions ended cleanly; reads drain the queue,
	// then return io.EOF.
	stateClosed
	// stateReset: the stream was aborted (by the peer, the session's end
	// or a local Close); reads drain what was queued, then return err.
	stateReset
	// stateRefused: the open failed (the agent's status was not ok, or the
	// stream ended before the answer); reads and writes return err.
	stateRefused
)

// jsonStream is one stream in JSON mode.
type jsonStream struct {
	m    *jsonMux
	id   uint32
	kind protocol.Kind

	readable chan struct{} // cap 1: data, EOF or error arrived
	writable chan struct{} // cap 1: credit arrived or the stream failed
	openDone chan struct{} // closed once the open result is known

	mu       sync.Mutex
	state    streamState
	err      error // why the stream ended, in stateReset and stateRefused
	chunks   chunkQueue
	buffered int // bytes queued in chunks
	unacked  int // bytes received and not yet credited back
	consumed int // bytes read since the last credit message
	credit   int
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

// run is the session's only reader in JSON mode; the session ends when it
// returns.
func (m *jsonMux) run() {
	m.c.fail(m.readLoop())
}

func (m *jsonMux) readLoop() error {
	for {
		typ, b, err := m.c.readMessage()
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
			err = m.onControl(msg)
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
	switch st.state {
	case stateReset, stateRefused:
		pool.Put(buf) // sent before the peer learned of the end
		return nil
	case stateReadClosed, stateClosed:
		pool.Put(buf)
		return fmt.Errorf("%w: data after close on stream %d", ErrProtocol, id)
	}
	if kind == protocol.KindUDP {
		if st.buffered+n > m.window || st.chunks.len() >= udpQueueLen {
			st.dropped++
			pool.Put(buf)
			return nil
		}
	} else {
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
	if m.role == gatewayRole {
		return fmt.Errorf("%w: %s sent to the gateway", ErrProtocol, o.Type())
	}
	var client netip.AddrPort
	if o.Client != "" {
		client, _ = netip.ParseAddrPort(o.Client) // validated by Decode
	}
	h := protocol.StreamHeader{Kind: o.Kind, Service: o.Service, Client: client}
	if o.Public != "" {
		h.Public, _ = netip.ParseAddrPort(o.Public) // validated by Decode
	}
	m.mu.Lock()
	if _, dup := m.streams[o.ID]; dup {
		m.mu.Unlock()
		return fmt.Errorf("%w: %s reuses open stream id %d", ErrProtocol, o.Type(), o.ID)
	}
	if m.err != nil {
		err := m.err
		m.mu.Unlock()
		return err
	}
	if len(m.streams) >= m.maxStreams {
		m.mu.Unlock()
		return m.refuseOpen(o.Kind, o.ID, protocol.StatusOverLimit)
	}
	st := m.newStream(o.ID, o.Kind)
	close(st.openDone)
	m.streams[o.ID] = st
	m.mu.Unlock()

	in := &Incoming{
		readHeader: func() (protocol.StreamHeader, error) { return h, nil },
		reply: func(status protocol.Status) (Stream, error) {
			if err := m.answerOpen(st, status); err != nil {
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
		return m.refuseOpen(o.Kind, o.ID, protocol.StatusOverLimit)
	}
}

// refuseOpen answers an open from the read loop itself, ahead of data: the
// read loop must never wait behind data.
func (m *jsonMux) refuseOpen(kind protocol.Kind, id uint32, status protocol.Status) error {
	b, err := protocol.Encode(&protocol.OpenResult{Kind: kind, ID: id, Status: status})
	if err != nil {
		return err
	}
	return m.c.queueControlText(b)
}

// answerOpen sends the application's answer to an open on the data queue,
// so that the data the application writes next follows it.
func (m *jsonMux) answerOpen(st *jsonStream, status protocol.Status) error {
	b, err := protocol.Encode(&protocol.OpenResult{Kind: st.kind, ID: st.id, Status: status})
	if err != nil {
		return err
	}
	return m.c.queueDataText(b)
}

func (m *jsonMux) onOpenResult(r *protocol.OpenResult) error {
	if m.role != gatewayRole {
		return fmt.Errorf("%w: %s sent to the agent", ErrProtocol, r.Type())
	}
	st := m.lookup(r.ID)
	if st == nil {
		return nil // the client went away meanwhile
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	switch st.state {
	case stateReset, stateRefused:
		// Ended here meanwhile (also between the lookup and the lock):
		// the answer comes too late to matter.
		return nil
	}
	select {
	case <-st.openDone:
		return fmt.Errorf("%w: second %s for stream %d", ErrProtocol, r.Type(), r.ID)
	default:
	}
	if r.Status != protocol.StatusOK {
		st.state, st.err = stateRefused, &protocol.OpenError{Status: r.Status}
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
	if st.kind == protocol.KindTCP && !c.Half {
		st.abort(ErrStreamReset)
		m.remove(st)
		return nil
	}
	// A TCP half close, or the normal end of a UDP session, which then
	// leaves the mux at once: reads drain the queue, then return io.EOF.
	switch st.state {
	case stateOpen:
		st.state = stateReadClosed
	case stateWriteClosed:
		st.state = stateClosed
		m.remove(st)
	}
	if st.kind == protocol.KindUDP {
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

// close fails every stream once the session has ended.
func (m *jsonMux) close(err error) {
	m.mu.Lock()
	m.err = err
	streams := m.streams
	m.streams = map[uint32]*jsonStream{}
	m.mu.Unlock()
	for _, st := range streams {
		st.mu.Lock()
		st.abort(err)
		st.mu.Unlock()
	}
}

func (m *jsonMux) open(ctx context.Context, h protocol.StreamHeader) (Stream, error) {
	if err := protocol.ValidateServiceID(h.Service); err != nil {
		return nil, err
	}
	m.mu.Lock()
	if m.err != nil {
		err := m.err
		m.mu.Unlock()
		return nil, err
	}
	if len(m.streams) >= m.maxStreams {
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
	if h.Public.IsValid() {
		o.Public = h.Public.String()
	}
	b, err := protocol.Encode(o)
	if err == nil {
		err = m.c.queueDataText(b)
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
	case <-m.c.done:
		return nil, m.c.Err()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// abort ends both directions with err, unless the stream has already
// ended with an error: the first reason stays. A stream still waiting for
// its open result is refused. Caller holds st.mu.
func (st *jsonStream) abort(err error) {
	switch st.state {
	case stateReset, stateRefused:
		return
	}
	select {
	case <-st.openDone:
		st.state = stateReset
	default:
		st.state = stateRefused
		close(st.openDone)
	}
	st.err = err
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
	if st.state == stateRefused {
		return st.err
	}
	return nil
}

// lockQueued waits until data is queued and returns nil with st.mu held,
// or returns why no more data will come (io.EOF at the peer's clean end)
// with st.mu released.
func (st *jsonStream) lockQueued() error {
	for {
		st.mu.Lock()
		queued := st.chunks.len() > 0
		switch st.state {
		case stateRefused:
			err := st.err
			st.mu.Unlock()
			return err
		case stateReset:
			if !queued {
				err := st.err
				st.mu.Unlock()
				return err
			}
		case stateReadClosed, stateClosed:
			if !queued {
				st.mu.Unlock()
				return io.EOF
			}
		}
		if queued {
			return nil
		}
		st.mu.Unlock()
		st.waitReadable()
	}
}

// waitReadable blocks until the stream may have changed state.
func (st *jsonStream) waitReadable() {
	select {
	case <-st.readable:
	case <-st.m.c.done:
		// The mux fails every stream once the session has ended; don't
		// spin waiting for it.
		err := st.m.c.Err()
		st.mu.Lock()
		st.abort(err)
		st.mu.Unlock()
	}
}

func (st *jsonStream) Read(p []byte) (int, error) {
	if err := st.lockQueued(); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		st.mu.Unlock()
		return 0, nil
	}
	n := st.take(p)
	credit := 0
	// Credit back after a quarter of the window, or once the queue is
	// drained and at least 1/16 of the window has been read: small reads
	// of a trickle need not cost a credit message each.
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
	_ = st.m.c.queueControl(outMsg{typ: websocket.TextMessage, buf: buf})
}

// errWriteClosed is returned by Write after CloseWrite.
var errWriteClosed = errors.New("tunnel: write after CloseWrite")

func (st *jsonStream) Write(p []byte) (int, error) {
	if st.kind != protocol.KindTCP {
		return 0, errors.New("tunnel: Write on a udp stream: use WritePacket")
	}
	total := 0
	for total < len(p) {
		n, err := st.takeCredit(len(p) - total)
		if err != nil {
			return total, err
		}
		if err := st.sendData(p[total : total+n]); err != nil {
			return total, err
		}
		total += n
	}
	return total, nil
}

// takeCredit waits for credit and takes up to want bytes of it, at most
// one message's worth.
func (st *jsonStream) takeCredit(want int) (int, error) {
	for {
		st.mu.Lock()
		switch st.state {
		case stateWriteClosed, stateClosed:
			st.mu.Unlock()
			return 0, errWriteClosed
		case stateReset, stateRefused:
			err := st.err
			st.mu.Unlock()
			return 0, err
		}
		if st.credit > 0 {
			n := min(st.credit, st.m.maxData, want)
			st.credit -= n
			st.mu.Unlock()
			return n, nil
		}
		st.mu.Unlock()
		select {
		case <-st.writable:
		case <-st.m.c.done:
			return 0, st.m.c.Err()
		}
	}
}

// sendData sends p as one tcp_data or udp_data message, behind the
// stream's earlier messages.
func (st *jsonStream) sendData(p []byte) error {
	buf := pool.Get(protocol.DataOverhead + (len(p)+2)/3*4)
	*buf = protocol.AppendData((*buf)[:0], st.kind, st.id, p)
	return st.m.c.queueData(outMsg{typ: websocket.TextMessage, buf: buf})
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
	var err error
	switch st.state {
	case stateReset, stateRefused:
		err = st.err
	}
	st.mu.Unlock()
	if err != nil {
		return err
	}
	return st.sendData(p)
}

// ReadPacket returns the next queued datagram.
func (st *jsonStream) ReadPacket(buf []byte) (int, error) {
	if err := st.lockQueued(); err != nil {
		return 0, err
	}
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

// Dropped returns how many datagrams arrived while the queue was full.
func (st *jsonStream) Dropped() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.dropped
}

func (st *jsonStream) CloseWrite() error {
	st.mu.Lock()
	switch st.state {
	case stateOpen:
		st.state = stateWriteClosed
	case stateReadClosed:
		st.state = stateClosed
		st.m.remove(st)
	default:
		st.mu.Unlock()
		return nil
	}
	st.mu.Unlock()
	return st.sendCloseWrite()
}

// sendCloseWrite tells the peer that this side has finished sending.
func (st *jsonStream) sendCloseWrite() error {
	return st.sendClose(&protocol.Close{Kind: st.kind, ID: st.id, Half: true})
}

// sendReset tells the peer that the stream is aborted.
func (st *jsonStream) sendReset() error {
	return st.sendClose(&protocol.Close{Kind: st.kind, ID: st.id})
}

// sendClose sends c behind the stream's data, which it must not overtake.
func (st *jsonStream) sendClose(c *protocol.Close) error {
	b, err := protocol.Encode(c)
	if err != nil {
		return err
	}
	return st.m.c.queueDataText(b)
}

// Close releases the stream: cleanly if both directions have ended,
// otherwise by aborting it.
func (st *jsonStream) Close() error {
	st.mu.Lock()
	clean := st.state == stateClosed
	st.mu.Unlock()
	if clean {
		st.discard()
		return nil
	}
	return st.Reset()
}

// Reset aborts the stream and tells the peer, unless the stream had
// already ended with an error.
func (st *jsonStream) Reset() error {
	if st.discard() {
		return st.sendReset()
	}
	return nil
}

// discard forgets the stream locally and frees its queue. It reports
// whether this ended the stream (rather than an earlier error).
func (st *jsonStream) discard() bool {
	st.m.remove(st)
	st.mu.Lock()
	defer st.mu.Unlock()
	for st.chunks.len() > 0 {
		pool.Put(st.chunks.pop().buf)
	}
	st.chunks = chunkQueue{}
	st.buffered = 0
	switch st.state {
	case stateReset, stateRefused:
		return false
	}
	st.abort(errStreamClosed)
	return true
}

// errStreamClosed is returned by a stream's methods after Close.
var errStreamClosed = errors.New("tunnel: use of closed stream")
