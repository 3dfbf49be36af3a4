package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// opTimeout bounds a single write/read exchange: a path that stalls this
// long is broken, not slow.
const opTimeout = 10 * time.Second

// abortOnDone makes blocked reads and writes on c return once ctx ends.
// Call the returned stop when done with c.
func abortOnDone(ctx context.Context, c net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
}

// firstErr keeps the first error reported by concurrent workers.
type firstErr struct {
	once sync.Once
	err  error
	set  chan struct{}
}

func newFirstErr() *firstErr { return &firstErr{set: make(chan struct{})} }

func (f *firstErr) report(err error) {
	f.once.Do(func() {
		f.err = err
		close(f.set)
	})
}

// throughputResult is one throughput window.
type throughputResult struct {
	bytes   int64
	elapsed time.Duration
	// usageResult holds the CPU seconds the watched processes used in
	// the window, and their peak memory from the first connection on
	// (warm-up included), in the order given.
	usageResult
}

func (r throughputResult) gbps() float64 { return float64(r.bytes) * 8 / r.elapsed.Seconds() / 1e9 }

// throughputWrite is the size of each client write.
const throughputWrite = 128 << 10

// throughput sends bulk data on streams connections to addr, which leads to
// snk, and measures the rate at which snk receives it over d, after warmup
// (connection setup and window growth are not what this measures), and the
// CPU time procs use in the same window. Their peak RSS counts from before
// the first connection. Before returning it waits for snk to have seen
// every connection close, so the next measurement starts clean.
func throughput(ctx context.Context, addr string, streams int, warmup, d time.Duration, snk *sink, procs []proc) (throughputResult, error) {
	u, err := beginUsage(procs)
	if err != nil {
		return throughputResult{}, err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conns := make([]net.Conn, 0, streams)
	defer func() { closeAll(conns) }()
	dialer := net.Dialer{Timeout: dialTimeout}
	for range streams {
		c, err := dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			u.end()
			return throughputResult{}, fmt.Errorf("dial: %w", err)
		}
		conns = append(conns, c)
	}
	buf := make([]byte, throughputWrite) // only read by the writers
	fe := newFirstErr()
	var wg sync.WaitGroup
	for _, c := range conns {
		stop := abortOnDone(wctx, c)
		wg.Go(func() {
			defer stop()
			for {
				if _, err := c.Write(buf); err != nil {
					if wctx.Err() == nil {
						fe.report(fmt.Errorf("write: %w", err))
					}
					return
				}
			}
		})
	}
	res, err := throughputWindow(ctx, warmup, d, snk, u, fe)
	cancel()
	wg.Wait()
	closeAll(conns)
	if err != nil {
		return res, err
	}
	// The clients closed; what they wrote still drains through the path.
	if err := snk.waitIdle(ctx, opTimeout); err != nil {
		return res, err
	}
	return res, nil
}

// throughputWindow waits out warmup, then measures snk and u over d. It
// ends u.
func throughputWindow(ctx context.Context, warmup, d time.Duration, snk *sink, u *usage, fe *firstErr) (throughputResult, error) {
	wait := func(d time.Duration) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-fe.set:
			return fe.err
		}
	}
	err := wait(warmup)
	if err == nil {
		err = u.markCPU()
	}
	if err != nil {
		u.end()
		return throughputResult{}, err
	}
	b0, t0 := snk.received.Load(), time.Now()
	werr := wait(d)
	b1, t1 := snk.received.Load(), time.Now()
	use, uerr := u.end()
	if err := errors.Join(werr, uerr); err != nil {
		return throughputResult{}, err
	}
	return throughputResult{bytes: b1 - b0, elapsed: t1.Sub(t0), usageResult: use}, nil
}

// rrResult is a round-trip measurement.
type rrResult struct {
	n        int
	elapsed  time.Duration
	p50, p99 time.Duration
	// cpu is the CPU seconds the watched processes used over the timed
	// round trips.
	cpu float64
}

func (r rrResult) perSecond() float64 { return float64(r.n) / r.elapsed.Seconds() }

// Round-trip bounds: warm-up exchanges before timing, and a cap on samples
// so that memory stays bounded whatever the speed.
const (
	rrWarmup     = 100
	rrMaxSamples = 1 << 22
)

// roundTrips sends 1-byte messages to the echo server at addr on one
// connection, each after the previous answer, for d, and measures the CPU
// time procs use over the timed round trips.
func roundTrips(ctx context.Context, addr string, d time.Duration, procs []proc) (rrResult, error) {
	dialer := net.Dialer{Timeout: dialTimeout}
	c, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return rrResult{}, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	// One deadline for the whole measurement: warm-up and d, plus the
	// time one stalled exchange may take.
	c.SetDeadline(time.Now().Add(d + opTimeout))
	stop := abortOnDone(ctx, c)
	defer stop()
	var msg [1]byte
	exchange := func() error {
		if _, err := c.Write(msg[:]); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(c, msg[:]); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		return nil
	}
	for range rrWarmup {
		if err := exchange(); err != nil {
			return rrResult{}, ctxOr(ctx, err)
		}
	}
	lat := make([]time.Duration, 0, 1<<16)
	cpu0, err := cpuAll(procs)
	if err != nil {
		return rrResult{}, err
	}
	start := time.Now()
	end := start.Add(d)
	last := start
	for now := start; now.Before(end) && len(lat) < rrMaxSamples; {
		if err := exchange(); err != nil {
			return rrResult{}, ctxOr(ctx, err)
		}
		last = time.Now()
		lat = append(lat, last.Sub(now))
		now = last
	}
	cpu1, err := cpuAll(procs)
	if err != nil {
		return rrResult{}, err
	}
	slices.Sort(lat)
	return rrResult{n: len(lat), elapsed: last.Sub(start), p50: percentile(lat, 0.50), p99: percentile(lat, 0.99), cpu: cpu1 - cpu0}, nil
}

// percentile returns the nearest-rank q-quantile of sorted samples.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// connRate opens connections to the echo server at addr from workers
// concurrent loops for d: connect, one 1-byte exchange, close. It returns
// the completed connections per second.
func connRate(ctx context.Context, addr string, workers int, d time.Duration) (float64, error) {
	var n atomic.Int64
	fe := newFirstErr()
	start := time.Now()
	end := start.Add(d)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for time.Now().Before(end) && ctx.Err() == nil {
				select {
				case <-fe.set:
					return
				default:
				}
				c, err := echoOnce(ctx, addr)
				if err != nil {
					fe.report(err)
					return
				}
				c.Close()
				n.Add(1)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if ctx.Err() != nil {
		return 0, context.Cause(ctx)
	}
	if fe.err != nil {
		return 0, fmt.Errorf("after %d connections: %w", n.Load(), fe.err)
	}
	return float64(n.Load()) / elapsed.Seconds(), nil
}

// echoOnce connects to addr and completes one 1-byte exchange, so the
// connection is established end to end. The caller closes it.
func echoOnce(ctx context.Context, addr string) (net.Conn, error) {
	dialer := net.Dialer{Timeout: dialTimeout}
	c, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	c.SetDeadline(time.Now().Add(opTimeout))
	stop := abortOnDone(ctx, c)
	defer stop()
	msg := [1]byte{'x'}
	if _, err := c.Write(msg[:]); err != nil {
		c.Close()
		return nil, ctxOr(ctx, fmt.Errorf("write: %w", err))
	}
	if _, err := io.ReadFull(c, msg[:]); err != nil {
		c.Close()
		return nil, ctxOr(ctx, fmt.Errorf("read: %w", err))
	}
	if stop() {
		c.SetDeadline(time.Time{}) // it may now sit idle for any length of time
	}
	return c, nil
}

// openIdle opens n connections to the echo server at addr, each after a
// completed 1-byte exchange, from workers concurrent loops. On error it
// closes what it opened.
func openIdle(ctx context.Context, addr string, n, workers int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	var next atomic.Int64
	fe := newFirstErr()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				select {
				case <-fe.set:
					return
				default:
				}
				c, err := echoOnce(ctx, addr)
				if err != nil {
					fe.report(fmt.Errorf("connection %d: %w", i+1, err))
					return
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	err := fe.err
	if err == nil && ctx.Err() != nil {
		err = context.Cause(ctx)
	}
	if err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

// ctxOr returns ctx's cause when ctx has ended (the error is then only its
// consequence), else err.
func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return err
}
