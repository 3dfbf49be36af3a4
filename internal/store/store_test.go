package store

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestFileRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "gateway.db")
	f := &File{Path: path}
	got, err := f.Load(context.Background())
	if err != nil || got != nil {
		t.Fatalf("missing file: %v, %v", got, err)
	}
	want := []Allocation{
		{Agent: "a", Service: "redis", Protocol: "tcp", Port: 16379, LastUsed: time.Unix(100, 0).UTC()},
		{Agent: "b", Service: "ns/gw/dns", Protocol: "udp", Port: 10053, LastUsed: time.Unix(200, 0).UTC()},
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

// FuzzDecode checks the state file decoder never panics and accepts only
// consistent states.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"version":1,"allocations":[{"agent":"a","service":"s","protocol":"tcp","port":5}]}`))
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		allocs, err := Decode(b)
		if err != nil {
			return
		}
		ports := map[string]bool{}
		for _, a := range allocs {
			k := a.Protocol + string(rune(a.Port))
			if ports[k] {
				t.Fatalf("duplicate accepted: %+v", a)
			}
			ports[k] = true
		}
	})
}
