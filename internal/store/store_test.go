package store

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

func TestFileConformance(t *testing.T) {
	runConformance(t, func(t *testing.T, opt Options) Store {
		return &File{Path: filepath.Join(t.TempDir(), "gateway.db"), Options: opt}
	})
}

func TestMemoryConformance(t *testing.T) {
	runConformance(t, func(t *testing.T, opt Options) Store { return &Memory{Options: opt} })
}

// A state file written by an earlier build (no "live" field) keeps its
// ports, and what the store writes reads back the same in a new store.
func TestFileKeepsOldStateFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "gateway.db")
	old := `{"version":1,"allocations":[
	 {"agent":"a","service":"redis","protocol":"tcp","port":16379,"last_used":"2026-01-02T03:04:05Z"},
	 {"agent":"b","service":"ns/gw/dns","protocol":"udp","port":10053,"last_used":"2026-01-02T03:04:06Z"}]}`
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	f := &File{Path: path}
	got, _, err := f.List(ctx)
	if err != nil || len(got) != 2 || got[0].Port != 16379 || got[1].Port != 10053 || got[0].Live {
		t.Fatalf("old state file read as %+v, %v", got, err)
	}
	if _, err := f.Claim(ctx, alloc("b", "x", 16379)); !errors.Is(err, ErrTaken) {
		t.Fatalf("a port of the old state file was given away: %v", err)
	}
	if _, err := f.Claim(ctx, alloc("c", "new", 20000)); err != nil {
		t.Fatal(err)
	}
	again, _, err := (&File{Path: path}).List(ctx)
	if err != nil || len(again) != 3 || again[1].Agent != "c" || !again[1].Live {
		t.Fatalf("reloaded %+v, %v", again, err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
}

// A change the file cannot take is refused, reported as the store being
// unavailable, and not kept in memory either; with OnWriteError it is kept
// and written with the next change the file can take.
func TestFileWriteFailure(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	f := &File{Path: filepath.Join(stateDir, "gateway.db")}
	ctx := context.Background()
	if _, err := f.Claim(ctx, alloc("a", "s", 100)); err != nil {
		t.Fatal(err)
	}
	// A file where the directory was: no write can succeed, root or not.
	if err := os.RemoveAll(stateDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stateDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Claim(ctx, alloc("a", "t", 101)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("claim with an unwritable state file: %v", err)
	}
	if all, _, _ := f.List(ctx); len(all) != 1 {
		t.Fatalf("failed claim kept in memory: %+v", all)
	}
	var reported []error
	f.OnWriteError = func(err error) { reported = append(reported, err) }
	if _, err := f.Claim(ctx, alloc("a", "t", 101)); err != nil || len(reported) != 1 {
		t.Fatalf("claim with OnWriteError: %v, reported %v", err, reported)
	}
	if err := os.Remove(stateDir); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Claim(ctx, alloc("a", "u", 102)); err != nil {
		t.Fatal(err)
	}
	if all, _, _ := (&File{Path: f.Path}).List(ctx); len(all) != 3 {
		t.Fatalf("the file holds %+v after the disk recovered, want all three", all)
	}
}

func TestDecodeRejects(t *testing.T) {
	cases := map[string]string{
		`garbage`:       "corrupt state",
		`{"version":2}`: "state version 2",
		`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"sctp","port":1}]}`:                                                      "invalid",
		`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":0}]}`:                                                       "invalid",
		`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":5},{"agent":"b","service":"t","protocol":"tcp","port":5}]}`: "allocated twice",
	}
	for in, want := range cases {
		if _, err := Decode([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want %q", in, err, want)
		}
	}
}

// FuzzDecode checks the state file decoder: it never panics, accepts only
// valid allocations with no (protocol, port) pair twice, and what it accepts
// survives the store's encoding and a second Decode unchanged.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":5}]}`))
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":55296,"live":true},{"agent":"a","service":"t","protocol":"tcp","port":55297,"last_used":"2026-11-28T09:00:00.5+01:00"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		allocs, err := Decode(b)
		if err != nil {
			return
		}
		seen := map[Key]bool{}
		for _, a := range allocs {
			if a.Agent == "" || a.Service == "" || !a.Protocol.Valid() || a.Port < 1 || a.Port > 65535 {
				t.Fatalf("invalid allocation accepted: %+v", a)
			}
			if seen[a.Key()] {
				t.Fatalf("duplicate accepted: %+v", a)
			}
			seen[a.Key()] = true
		}
		out, err := json.MarshalIndent(fileFormat{Version: fileVersion, Allocations: allocs}, "", "  ")
		if err != nil {
			t.Fatalf("accepted %q but cannot encode it: %v", b, err)
		}
		again, err := Decode(out)
		if err != nil {
			t.Fatalf("accepted %q but not its encoding %q: %v", b, out, err)
		}
		if len(again) != len(allocs) {
			t.Fatalf("%d allocations read back as %d", len(allocs), len(again))
		}
		for i, a := range allocs {
			g := again[i]
			if !g.sameOwner(a) || g.Port != a.Port || g.Live != a.Live || !g.LastUsed.Equal(a.LastUsed) {
				t.Fatalf("allocation %d: %+v read back as %+v", i, a, g)
			}
		}
	})
}

// The state file names protocols "tcp" and "udp", as it always has.
func TestFileProtocolSpelling(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gateway.db")
	u := Allocation{Agent: "a", Service: "dns", Protocol: protocol.KindUDP, Port: 10053, LastUsed: time.Now()}
	if _, err := (&File{Path: path}).Claim(context.Background(), u); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"protocol": "udp"`) {
		t.Fatalf("saved state does not spell the protocol \"udp\":\n%s", b)
	}
}

// A watcher resuming from further back than the file store keeps events
// for is told to list again, not given a partial history.
func TestFileWatchCompacted(t *testing.T) {
	m := &Memory{}
	ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
	defer cancel()
	for i := range historyLen + 10 {
		if _, err := m.Claim(ctx, alloc("a", "s", 1+i%1000)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case e := <-m.Watch(ctx, 1):
		if !errors.Is(e.Err, ErrCompacted) {
			t.Fatalf("watch from revision 1: %+v, want ErrCompacted", e)
		}
	case <-ctx.Done():
		t.Fatal("no answer from the watch")
	}
	_, rev, _ := m.List(ctx)
	w := m.Watch(ctx, rev)
	if _, err := m.Claim(ctx, alloc("a", "s", 2000)); err != nil {
		t.Fatal(err)
	}
	if e := next(t, w); e.Alloc.Port != 2000 || e.Revision != rev+1 {
		t.Fatalf("watch from the listed revision: %+v", e)
	}
}
