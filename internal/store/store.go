// Package store persists the gateway's port allocations, so that a restart
// or a reconnect gives every service the same public port again. The
// gateway sees only the Store interface: a file for a single gateway today,
// a shared store (etcd) for several replicas later.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// Allocation is one public port held by one service of one agent.
type Allocation struct {
	Agent    string        `json:"agent"`
	Service  string        `json:"service"`
	Protocol protocol.Kind `json:"protocol"`
	Port     int           `json:"port"`
	// LastUsed is when the service was last registered; a withdrawn
	// service's port stays reserved for port_retention after it.
	LastUsed time.Time `json:"last_used"`
}

// Store loads and saves the full set of allocations.
type Store interface {
	Load(ctx context.Context) ([]Allocation, error)
	Save(ctx context.Context, allocs []Allocation) error
}

// Memory is a Store that keeps allocations in memory only.
type Memory struct {
	mu     sync.Mutex
	allocs []Allocation
}

// Load implements Store.
func (m *Memory) Load(context.Context) ([]Allocation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Allocation(nil), m.allocs...), nil
}

// Save implements Store.
func (m *Memory) Save(_ context.Context, a []Allocation) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.allocs = append([]Allocation(nil), a...)
	return nil
}

// File is a Store in one JSON file, replaced atomically on every save.
type File struct {
	Path string
	mu   sync.Mutex
}

const fileVersion = 1

type fileFormat struct {
	Version     int          `json:"version"`
	Allocations []Allocation `json:"allocations"`
}

// Load implements Store. A missing file is an empty state.
func (f *File) Load(context.Context) ([]Allocation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, err := os.ReadFile(f.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	a, err := Decode(b)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", f.Path, err)
	}
	return a, nil
}

// Decode parses and validates the state file's contents.
func Decode(b []byte) ([]Allocation, error) {
	var ff fileFormat
	if err := json.Unmarshal(b, &ff); err != nil {
		return nil, fmt.Errorf("corrupt state: %w", err)
	}
	if ff.Version != fileVersion {
		return nil, fmt.Errorf("state version %d, this build reads %d", ff.Version, fileVersion)
	}
	type key struct {
		proto protocol.Kind
		port  int
	}
	seen := map[key]bool{}
	for i, a := range ff.Allocations {
		if a.Agent == "" || a.Service == "" || !a.Protocol.Valid() || a.Port < 1 || a.Port > 65535 {
			return nil, fmt.Errorf("allocation %d is invalid: %+v", i, a)
		}
		k := key{a.Protocol, a.Port}
		if seen[k] {
			return nil, fmt.Errorf("%s port %d is allocated twice", a.Protocol, a.Port)
		}
		seen[k] = true
	}
	return ff.Allocations, nil
}

// Save implements Store: it writes a temporary file, syncs it and renames
// it over the old one, so a crash leaves either the old or the new state.
func (f *File) Save(_ context.Context, a []Allocation) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, err := json.MarshalIndent(fileFormat{Version: fileVersion, Allocations: a}, "", "  ")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	dir := filepath.Dir(f.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(f.Path)+".tmp*")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("store: write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("store: sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.Path); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
