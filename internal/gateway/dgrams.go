package gateway

import (
	"math/bits"
	"sync"
)

// dgramPool recycles the buffers of queued datagrams in size classes a
// quarter of a power of two apart (..., 512, 640, 768, 896, 1024, 1280, ...),
// so a queued datagram holds at most 25% more than its size (plus the
// smallest class for tiny ones). The general pool's classes are four to
// eight times apart, which would let a 513-byte datagram hold 4 KiB and
// make the queue budget count mostly slack.
type dgramPool struct {
	pools [dgramClasses]sync.Pool
}

const (
	// dgramMinShift is the smallest class, 1<<dgramMinShift bytes.
	dgramMinShift = 8
	// dgramSteps is the number of classes per doubling.
	dgramSteps = 4
	// dgramClasses covers up to 1<<17 bytes, above the largest datagram.
	dgramClasses = 1 + (17-dgramMinShift)*dgramSteps
)

// dgramClass returns the class index and the class size for n bytes.
func dgramClass(n int) (int, int) {
	if n <= 1<<dgramMinShift {
		return 0, 1 << dgramMinShift
	}
	k := bits.Len(uint(n - 1)) // 1<<(k-1) < n <= 1<<k
	base, step := 1<<(k-1), 1<<(k-1)/dgramSteps
	j := (n - base + step - 1) / step // 1..dgramSteps
	return 1 + (k-1-dgramMinShift)*dgramSteps + j - 1, base + j*step
}

// get returns a buffer of length n. Sizes beyond the classes are
// allocated and not recycled.
func (p *dgramPool) get(n int) *[]byte {
	i, size := dgramClass(n)
	if i >= dgramClasses {
		b := make([]byte, n)
		return &b
	}
	if v := p.pools[i].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, size)
	return &b
}

// put recycles a buffer obtained from get.
func (p *dgramPool) put(b *[]byte) {
	c := cap(*b)
	i, size := dgramClass(c)
	if i < dgramClasses && size == c {
		p.pools[i].Put(b)
	}
}
