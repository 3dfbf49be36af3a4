package bench

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// proc reads one child process's resource use from /proc.
type proc int

// clockTicks is USER_HZ, the unit of the CPU times in /proc/PID/stat. It is
// 100 on every Linux architecture Go supports, whatever the kernel's HZ.
const clockTicks = 100

// cpuSeconds returns the process's user plus system CPU time so far, all
// threads together.
func (p proc) cpuSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
	if err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return parseStatCPU(b)
}

// cpuAll returns the CPU seconds of procs together so far.
func cpuAll(procs []proc) (float64, error) {
	var sum float64
	for _, p := range procs {
		c, err := p.cpuSeconds()
		if err != nil {
			return 0, err
		}
		sum += c
	}
	return sum, nil
}

// parseStatCPU returns utime+stime in seconds from the contents of
// /proc/PID/stat. The command name (field 2) may itself hold spaces and
// parentheses, so fields are counted from the last ')'.
func parseStatCPU(b []byte) (float64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("cpu time: malformed /proc stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so utime (field 14) and stime (field 15)
	// are f[11] and f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time: malformed /proc stat: %d fields after the command name", len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("cpu time: %w", err)
	}
	return float64(ut+st) / clockTicks, nil
}

// status returns the contents of /proc/PID/status.
func (p proc) status() ([]byte, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
	if err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	return b, nil
}

// statusKB returns a memory field ("VmRSS", "RssAnon", ...) of
// /proc/PID/status in KiB.
func (p proc) statusKB(field string) (int64, error) {
	b, err := p.status()
	if err != nil {
		return 0, err
	}
	return parseStatusKB(b, field)
}

// parseStatusKB finds "field:   1234 kB" in /proc/PID/status contents.
func parseStatusKB(b []byte, field string) (int64, error) {
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, field+":")
		if !ok {
			continue
		}
		num, ok := strings.CutSuffix(strings.TrimSpace(rest), " kB")
		if !ok {
			return 0, fmt.Errorf("memory: %s: unexpected unit in %q", field, strings.TrimSpace(line))
		}
		v, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("memory: %s: %w", field, err)
		}
		return v, nil
	}
	return 0, fmt.Errorf("memory: no %s in /proc status", field)
}

// rssKB returns the resident set size now.
func (p proc) rssKB() (int64, error) { return p.statusKB("VmRSS") }

// resetPeak makes VmHWM (a lifetime peak) start over from the current RSS,
// so that it measures one phase.
func (p proc) resetPeak() error {
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/clear_refs", p), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("reset peak RSS: %w", err)
	}
	_, err = f.Write([]byte("5"))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("reset peak RSS: %w", err)
	}
	return nil
}

// usage measures the peak memory of processes from its start, and their
// CPU time from its start or from the last markCPU. The peak RSS comes from
// VmHWM after resetting it at the start; where the kernel refuses the
// reset, RSS is sampled instead. The peak private memory (RssAnon: heap,
// stacks and written data, without the executable's pages mapped from its
// file) has no kernel peak and is always sampled.
type usage struct {
	procs []proc
	cpu0  []float64
	reset []bool

	stop    chan struct{}
	sampled sync.WaitGroup
	// Sampled peaks, written by the sampler until it stops.
	maxKB, maxPrivateKB []int64
}

// usageResult is what a usage measured.
type usageResult struct {
	// cpu is the CPU seconds of all the processes together since the mark.
	cpu float64
	// peakKB and peakPrivateKB are each process's peak RSS and peak
	// private (anonymous) RSS since the start, in KiB.
	peakKB, peakPrivateKB []int64
}

// usageSample is how often memory is sampled.
const usageSample = 20 * time.Millisecond

// beginUsage starts measuring procs.
func beginUsage(procs []proc) (*usage, error) {
	u := &usage{
		procs: procs, cpu0: make([]float64, len(procs)), reset: make([]bool, len(procs)),
		maxKB: make([]int64, len(procs)), maxPrivateKB: make([]int64, len(procs)),
		stop: make(chan struct{}),
	}
	for i, p := range procs {
		u.reset[i] = p.resetPeak() == nil
	}
	if err := u.markCPU(); err != nil {
		return nil, err
	}
	u.sample()
	u.sampled.Add(1)
	go u.sampleLoop()
	return u, nil
}

// markCPU makes the CPU time count from now.
func (u *usage) markCPU() error {
	for i, p := range u.procs {
		c, err := p.cpuSeconds()
		if err != nil {
			return err
		}
		u.cpu0[i] = c
	}
	return nil
}

// sample records the current RSS (where VmHWM could not be reset) and
// private RSS of every process into the peaks.
func (u *usage) sample() {
	for i, p := range u.procs {
		b, err := p.status()
		if err != nil {
			continue // the process ended; end reports it
		}
		if kb, err := parseStatusKB(b, "RssAnon"); err == nil && kb > u.maxPrivateKB[i] {
			u.maxPrivateKB[i] = kb
		}
		if u.reset[i] {
			continue
		}
		if kb, err := parseStatusKB(b, "VmRSS"); err == nil && kb > u.maxKB[i] {
			u.maxKB[i] = kb
		}
	}
}

func (u *usage) sampleLoop() {
	defer u.sampled.Done()
	t := time.NewTicker(usageSample)
	defer t.Stop()
	for {
		select {
		case <-u.stop:
			return
		case <-t.C:
			u.sample()
		}
	}
}

// end stops measuring and returns the result. Call it once.
func (u *usage) end() (usageResult, error) {
	close(u.stop)
	u.sampled.Wait()
	u.sample() // the last moment counts too
	res := usageResult{peakKB: make([]int64, len(u.procs)), peakPrivateKB: u.maxPrivateKB}
	for i, p := range u.procs {
		c, err := p.cpuSeconds()
		if err != nil {
			return usageResult{}, err
		}
		res.cpu += c - u.cpu0[i]
		res.peakKB[i] = u.maxKB[i]
		if u.reset[i] {
			if res.peakKB[i], err = p.statusKB("VmHWM"); err != nil {
				return usageResult{}, err
			}
		}
	}
	return res, nil
}
