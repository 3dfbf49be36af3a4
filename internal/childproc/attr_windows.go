package childproc

import "syscall"

// SysProcAttr starts a child in a process group of its own, so that a
// Ctrl-C on the console reaches only the parent, which then stops its
// children.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{CreationFlags: syscall.CREATE_NEW_PROCESS_GROUP}
}
