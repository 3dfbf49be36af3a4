//go:build !windows && !(linux && 386)

package relay

import (
	"syscall"
	"unsafe"
)

// canPeek: peekByte works here.
const canPeek = true

// peekByte copies the next byte waiting on socket fd into *b without
// consuming it and without blocking: recvfrom(2) with MSG_PEEK and
// MSG_DONTWAIT. It returns the call's errno (0 on success).
func peekByte(fd uintptr, b *byte) syscall.Errno {
	_, _, e := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(b)), 1,
		syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	return e
}
