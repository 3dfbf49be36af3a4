// Package childproc holds the process attributes shared by everything that
// starts portway as a child process (the bench and the end-to-end tests):
// its own process group, and on Linux death with its parent.
package childproc
