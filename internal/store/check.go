package store

import (
	"fmt"
	"os"
	"path/filepath"
)

// CheckWritable makes sure the directory of the state file exists (creating
// it as Save would) and that a file can be created in it, so a gateway that
// could never persist its allocations refuses to start instead of finding
// out at the first registration.
func (f *File) CheckWritable() error {
	dir := filepath.Dir(f.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create directory %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(f.Path)+".check*")
	if err != nil {
		return fmt.Errorf("directory %s is not writable: %w", dir, err)
	}
	name := tmp.Name()
	err = tmp.Close()
	if rerr := os.Remove(name); err == nil && rerr != nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("directory %s: %w", dir, err)
	}
	return nil
}
