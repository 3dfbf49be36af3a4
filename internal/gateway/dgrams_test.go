package gateway

import "testing"

// Queued datagrams hold buffers close to their size: the queue budget
// counts real memory, not the slack of a coarse size class.
func TestDgramPoolRightSized(t *testing.T) {
	var p dgramPool
	prev := 0
	for n := 1; n <= 70000; n++ {
		i, size := dgramClass(n)
		if size < n {
			t.Fatalf("class for %d bytes holds only %d", n, size)
		}
		if n > 256 && size > n+n/4 {
			t.Fatalf("%d bytes take a %d-byte buffer, more than 25%% over", n, size)
		}
		if i < prev {
			t.Fatalf("class index went down at %d bytes", n)
		}
		prev = i
	}
	for _, n := range []int{1, 256, 257, 512, 513, 1200, 1500, 9000, 65535} {
		b := p.get(n)
		if len(*b) != n {
			t.Fatalf("get(%d) has length %d", n, len(*b))
		}
		_, size := dgramClass(n)
		if cap(*b) != size {
			t.Fatalf("get(%d) has capacity %d, want %d", n, cap(*b), size)
		}
		p.put(b)
	}
	if b := p.get(513); cap(*b) > 640 {
		t.Fatalf("a 513-byte datagram takes %d bytes", cap(*b))
	}
	if b := p.get(200000); len(*b) != 200000 {
		t.Fatal("oversized get")
	}
}
