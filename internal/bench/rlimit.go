//go:build unix

package bench

import (
	"fmt"
	"syscall"
)

// raiseNoFile makes room for conns idle connections: the bench process
// holds the client end of each (the echo server, a child, holds the other),
// so it needs conns descriptors and some to spare; so do the children
// (gateway, agent, echo server), which inherit its limits. It raises the
// soft limit, and the hard one when allowed (root). When the hard limit is
// too low and cannot be raised, it returns how many connections fit and a
// note saying so.
func raiseNoFile(conns int) (n int, note string, err error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, "", fmt.Errorf("RLIMIT_NOFILE: %w", err)
	}
	want := uint64(conns + fdReserve)
	if lim.Cur >= want {
		return conns, "", nil
	}
	raised := syscall.Rlimit{Cur: want, Max: max(lim.Max, want)}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
		return conns, "", nil
	}
	// Not allowed to raise the hard limit: use all of it.
	if lim.Cur < lim.Max {
		all := syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &all); err != nil {
			return 0, "", fmt.Errorf("RLIMIT_NOFILE: %w", err)
		}
		lim = all
	}
	if lim.Cur <= 2*fdReserve {
		return 0, "", fmt.Errorf("RLIMIT_NOFILE is %d, too low to hold idle connections (raise it with ulimit -n, or use --skip-idle)", lim.Cur)
	}
	n = int(lim.Cur - fdReserve)
	return n, fmt.Sprintf("RLIMIT_NOFILE hard limit %d (not raisable) allows %d idle connections, not %d", lim.Max, n, conns), nil
}
