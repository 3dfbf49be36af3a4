package childproc

import "syscall"

// SysProcAttr puts a child in its own process group, so that a Ctrl-C on
// the terminal reaches only the parent, which then stops its children in
// order; and has the kernel kill the child if the parent dies without
// cleaning up (SIGKILL, a crash, a test binary's timeout panic).
//
// The parent-death signal fires when the thread that started the child
// exits: callers that lock threads must start children from a thread that
// lives as long as they do.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
