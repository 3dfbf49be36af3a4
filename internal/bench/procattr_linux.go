package bench

import "syscall"

// sysProcAttr puts a child in its own process group, so that a Ctrl-C on
// the terminal reaches only the bench, which then stops its children in
// order; and has the kernel kill the child if the bench dies without
// cleaning up (SIGKILL, a crash).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
