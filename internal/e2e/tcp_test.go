package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testservers"
)

func TestEchoAndHalfClose(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
			eps := a.waitReady(t)
			payload := make([]byte, 4<<20)
			rand.Read(payload)
			if err := testnet.EchoRoundTrip(eps["echo"], payload); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A backend that answers only after the client's FIN: the FIN must travel
// through the tunnel, and the answer must travel back after it.
func TestHalfCloseReachesBackend(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, _ := io.ReadAll(c) // until the client's FIN
				fmt.Fprintf(c, "received %d bytes then EOF", len(req))
			}()
		}
	}()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "eof", Protocol: "tcp", Port: 9000, Backend: ln.Addr().String()}})
			eps := a.waitReady(t)
			c, err := net.Dial("tcp", eps["eof"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write(bytes.Repeat([]byte("x"), 300000))
			c.(*net.TCPConn).CloseWrite()
			reply, err := io.ReadAll(c)
			if err != nil || string(reply) != "received 300000 bytes then EOF" {
				t.Fatalf("reply %q, %v", reply, err)
			}
		})
	}
}

func TestPostgres(t *testing.T) {
	pg := testservers.Postgres(t)
	dir := t.TempDir()
	// 50+ MB of rows, written locally, copied in and out through the tunnel.
	src := filepath.Join(dir, "rows.tsv")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(f)
	row := make([]byte, 512)
	for i := 0; i < 52000; i++ {
		rand.Read(row)
		fmt.Fprintf(w, "%d\t%x\n", i, row)
	}
	w.Flush()
	f.Close()
	st, _ := os.Stat(src)
	if st.Size() < 50<<20 {
		t.Fatalf("test data is only %d bytes", st.Size())
	}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "postgres", Protocol: "tcp", Port: 5432, Backend: pg.Addr()}})
			host, port := splitHostPort(t, a.waitReady(t)["postgres"])
			out, err := pg.PSQL(t, host, port, "-tA", "-c", "select 40 + 2")
			if err != nil || strings.TrimSpace(string(out)) != "42" {
				t.Fatalf("query through the tunnel: %q, %v", out, err)
			}
			table := "rows_" + mode
			dst := filepath.Join(dir, "back-"+mode+".tsv")
			script := fmt.Sprintf("create table %s (id int, payload text);\n\\copy %s from '%s'\n\\copy (select * from %s order by id) to '%s'\n",
				table, table, src, table, dst)
			if out, err := pg.PSQL(t, host, port, "-c", "set client_min_messages=warning", "-f", writeFile(t, dir, mode+".sql", script)); err != nil {
				t.Fatalf("COPY through the tunnel: %s %v", out, err)
			}
			if a, b := fileSum(t, src), fileSum(t, dst); a != b {
				t.Fatalf("COPY round trip differs: %x vs %x", a, b)
			}
		})
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func fileSum(t *testing.T, path string) [32]byte {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func TestRedis(t *testing.T) {
	rd := testservers.Redis(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "redis", Protocol: "tcp", Port: 6379, Backend: rd.Addr()}})
			ep := a.waitReady(t)["redis"]
			host, port := splitHostPort(t, ep)
			if port != 16379 {
				t.Errorf("redis got public port %d, want the preferred 16379", port)
			}
			if out, err := rd.CLI(t, host, port, "SET", "greeting", "hello-"+mode); err != nil || strings.TrimSpace(string(out)) != "OK" {
				t.Fatalf("SET: %q %v", out, err)
			}
			if out, err := rd.CLI(t, host, port, "GET", "greeting"); err != nil || strings.TrimSpace(string(out)) != "hello-"+mode {
				t.Fatalf("GET: %q %v", out, err)
			}
			// A 96 KiB value in both directions (an argument may not exceed 128 KiB).
			big := strings.Repeat("0123456789abcdef", 6<<10)
			if out, err := rd.CLI(t, host, port, "SET", "big", big); err != nil || strings.TrimSpace(string(out)) != "OK" {
				t.Fatalf("SET big: %.200v", err)
			}
			if out, err := rd.CLI(t, host, port, "GET", "big"); err != nil || strings.TrimSpace(string(out)) != big {
				t.Fatalf("GET big: %d bytes, %v", len(out), err)
			}
		})
	}
}

func TestSSH(t *testing.T) {
	sshd := testservers.SSHD(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "blob")
	blob := make([]byte, 20<<20)
	rand.Read(blob)
	if err := os.WriteFile(src, blob, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "ssh", Protocol: "tcp", Port: 2222, Backend: sshd.Addr()}})
			host, port := splitHostPort(t, a.waitReady(t)["ssh"])
			if out, err := sshd.SSH(t, host, port, "echo", "hello", "from", "sshd"); err != nil || strings.TrimSpace(string(out)) != "hello from sshd" {
				t.Fatalf("ssh: %q %v", out, err)
			}
			remote := filepath.Join(dir, "remote-"+mode)
			if err := sshd.SCP(t, host, port, src, remote, true); err != nil {
				t.Fatalf("scp upload: %v", err)
			}
			back := filepath.Join(dir, "back-"+mode)
			if err := sshd.SCP(t, host, port, back, remote, false); err != nil {
				t.Fatalf("scp download: %v", err)
			}
			if fileSum(t, src) != fileSum(t, remote) || fileSum(t, src) != fileSum(t, back) {
				t.Fatal("scp round trip changed the file")
			}
		})
	}
}

func TestConcurrentConnections(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
			ep := a.waitReady(t)["echo"]
			var wg sync.WaitGroup
			errs := make(chan error, 200)
			for i := 0; i < 200; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					payload := make([]byte, 32<<10+i)
					rand.Read(payload)
					if err := testnet.EchoRoundTrip(ep, payload); err != nil {
						errs <- fmt.Errorf("connection %d: %w", i, err)
					}
				}(i)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}
