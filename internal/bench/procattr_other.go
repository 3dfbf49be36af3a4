//go:build !linux

package bench

import "syscall"

// sysProcAttr puts a child in its own process group, so that a Ctrl-C on
// the terminal reaches only the bench, which then stops its children.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
