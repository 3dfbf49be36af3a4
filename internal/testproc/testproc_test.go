package testproc

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// alive reports whether pid names a process that has not exited (a zombie
// counts as gone).
func alive(pid int) bool {
	_, _, ok := procStat(pid)
	if !ok {
		return false
	}
	b, _ := exec.Command("ps", "-o", "stat=", "-p", strconv.Itoa(pid)).Output()
	return len(b) > 0 && !strings.HasPrefix(strings.TrimSpace(string(b)), "Z")
}

// Stop ends the process and a child that left its process group, and the
// output is in the log.
func TestStopEndsProcessAndDescendants(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	// The child leaves the group (setsid), as sshd's session children do:
	// only the descendant sweep reaches it.
	cmd := exec.Command("sh", "-c", "echo started; setsid sleep 60 & echo $! > "+pidFile+"; wait")
	p := Start(t, "sh", cmd, filepath.Join(dir, "sh.log"), syscall.SIGTERM)
	var child int
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 500 && child == 0; i++ {
		if time.Now().After(deadline) {
			break
		}
		b, _ := os.ReadFile(pidFile)
		child, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		time.Sleep(20 * time.Millisecond)
	}
	if child == 0 {
		t.Fatal("the child never wrote its pid")
	}
	if p.Exited() || !alive(child) {
		t.Fatal("process or child gone before Stop")
	}
	p.Stop(t)
	if !p.Exited() {
		t.Error("the process is still running after Stop")
	}
	for i := 0; i < 100 && alive(child); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if alive(child) {
		t.Errorf("the child %d that left the group is still running after Stop", child)
	}
	if !strings.Contains(p.Log(), "started") || !strings.Contains(p.LogTail(), "started") {
		t.Errorf("log = %q", p.Log())
	}
	p.Stop(t) // a second Stop is harmless
}

func TestTailFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "log")
	cmd := exec.Command("sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done")
	pr := Start(t, "lines", cmd, p, syscall.SIGTERM)
	<-pr.Done()
	if got := TailFile(p, 2, 1<<10); got != "line4\nline5" {
		t.Errorf("last 2 lines = %q", got)
	}
	if got := TailFile(p, 10, 6); got != "line5" {
		t.Errorf("last 6 bytes = %q", got)
	}
	if got := TailFile(filepath.Join(dir, "missing"), 2, 10); !strings.Contains(got, "cannot read") {
		t.Errorf("missing file: %q", got)
	}
}
