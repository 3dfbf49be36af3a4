// Package pool recycles byte buffers for the data path, so that copying
// bytes and framing messages allocate nothing in steady state.
package pool

import "sync"

// Size classes, smallest first. The 64 KiB class holds a whole yamux frame
// or WebSocket data message; the largest holds a maximal JSON message.
var classes = [...]int{512, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20}

var pools [len(classes)]sync.Pool

func init() {
	for i, size := range classes {
		size := size
		pools[i].New = func() any {
			b := make([]byte, size)
			return &b
		}
	}
}

// Get returns a buffer of length n. Buffers larger than the largest class
// are allocated and not recycled. Return it with Put when done.
func Get(n int) *[]byte {
	for i, size := range classes {
		if n <= size {
			b := pools[i].Get().(*[]byte)
			*b = (*b)[:n]
			return b
		}
	}
	b := make([]byte, n)
	return &b
}

// Put returns a buffer obtained from Get. The caller must not use it after.
func Put(b *[]byte) {
	c := cap(*b)
	for i, size := range classes {
		if c == size {
			*b = (*b)[:size]
			pools[i].Put(b)
			return
		}
	}
}
