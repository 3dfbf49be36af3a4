//go:build !linux

package childproc

import "syscall"

// SysProcAttr puts a child in its own process group, so that a Ctrl-C on
// the terminal reaches only the parent, which then stops its children.
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
