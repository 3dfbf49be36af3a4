package relay

import (
	"runtime"
	"syscall"
	"unsafe"
)

// canPeek: peekByte works here.
const canPeek = true

// socketcallRecvfrom is SYS_RECVFROM of socketcall(2) (linux/net.h).
const socketcallRecvfrom = 12

// peekByte copies the next byte waiting on socket fd into *b without
// consuming it and without blocking: recvfrom(2) with MSG_PEEK and
// MSG_DONTWAIT. On linux/386 the socket calls go through socketcall(2),
// which takes its arguments as an array in memory.
func peekByte(fd uintptr, b *byte) syscall.Errno {
	args := [6]uintptr{fd, uintptr(unsafe.Pointer(b)), 1, syscall.MSG_PEEK | syscall.MSG_DONTWAIT, 0, 0}
	_, _, e := syscall.Syscall(syscall.SYS_SOCKETCALL, socketcallRecvfrom, uintptr(unsafe.Pointer(&args[0])), 0)
	runtime.KeepAlive(b)
	return e
}
