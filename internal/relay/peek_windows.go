package relay

import "syscall"

// canPeek: Windows sockets are not peeked here. Waiting for readability
// then returns at once and the read itself waits; UDP bursts are not
// batched.
const canPeek = false

// peekByte is never called where canPeek is false.
func peekByte(uintptr, *byte) syscall.Errno { return syscall.EWINDOWS }
