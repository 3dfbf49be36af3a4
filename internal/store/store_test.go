package store

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

func TestFileRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "gateway.db")
	f := &File{Path: path}
	got, err := f.Load(context.Background())
	if err != nil || got != nil {
		t.Fatalf("missing file: %v, %v", got, err)
	}
	want := []Allocation{
		{Agent: "a", Service: "redis", Protocol: protocol.KindTCP, Port: 16379, LastUsed: time.Unix(100, 0).UTC()},
		{Agent: "b", Service: "ns/gw/dns", Protocol: protocol.KindUDP, Port: 10053, LastUsed: time.Unix(200, 0).UTC()},
	}
	if err := f.Save(context.Background(), want); err != nil {
		t.Fatal(err)
	}
	got, err = (&File{Path: path}).Load(context.Background())
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("reloaded %+v, %v", got, err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
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
// survives Save's encoding and a second Decode unchanged.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":5}]}`))
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":55296},{"agent":"a","service":"t","protocol":"tcp","port":55297,"last_used":"2026-11-28T09:00:00.5+01:00"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		allocs, err := Decode(b)
		if err != nil {
			return
		}
		type key struct {
			proto protocol.Kind
			port  int
		}
		seen := map[key]bool{}
		for _, a := range allocs {
			if a.Agent == "" || a.Service == "" || !a.Protocol.Valid() || a.Port < 1 || a.Port > 65535 {
				t.Fatalf("invalid allocation accepted: %+v", a)
			}
			k := key{a.Protocol, a.Port}
			if seen[k] {
				t.Fatalf("duplicate accepted: %+v", a)
			}
			seen[k] = true
		}
		// Save's encoding of what was read must read back the same.
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
			if g.Agent != a.Agent || g.Service != a.Service || g.Protocol != a.Protocol || g.Port != a.Port || !g.LastUsed.Equal(a.LastUsed) {
				t.Fatalf("allocation %d: %+v read back as %+v", i, a, g)
			}
		}
	})
}

// The state file names protocols "tcp" and "udp", as it always has: a file
// written by an earlier build loads, and a saved one reads the same.
func TestFileProtocolSpelling(t *testing.T) {
	old := `{"version":1,"allocations":[{"agent":"a","service":"dns","protocol":"udp","port":10053,"last_used":"2026-01-02T03:04:05Z"}]}`
	got, err := Decode([]byte(old))
	if err != nil || len(got) != 1 || got[0].Protocol != protocol.KindUDP {
		t.Fatalf("Decode(%s) = %+v, %v", old, got, err)
	}
	path := filepath.Join(t.TempDir(), "gateway.db")
	if err := (&File{Path: path}).Save(context.Background(), got); err != nil {
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
