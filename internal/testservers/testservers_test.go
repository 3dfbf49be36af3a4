package testservers_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/testservers"
)

func TestPostgres(t *testing.T) {
	t.Parallel()
	start := time.Now()
	pg := testservers.Postgres(t)
	t.Logf("postgres ready in %v at %s", time.Since(start).Round(time.Millisecond), pg.Addr())
	if pg.Addr() != net.JoinHostPort("127.0.0.1", strconv.Itoa(pg.Port)) {
		t.Errorf("Addr() = %q, Port = %d", pg.Addr(), pg.Port)
	}

	out, err := pg.PSQL(t, pg.Host, pg.Port, "-tAc", "select 1")
	if err != nil {
		t.Fatalf("select 1: %v", err)
	}
	if got := strings.TrimSpace(string(out)); got != "1" {
		t.Fatalf("select 1 = %q", got)
	}

	out, err = pg.PSQL(t, pg.Host, pg.Port, "-tAc", "select current_user || ' ' || current_database()")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(out)), pg.User+" "+pg.Database; got != want {
		t.Errorf("user/db = %q, want %q", got, want)
	}

	script := `
create table items(id int primary key, name text not null);
insert into items values (1, 'one'), (2, 'two'), (3, 'three');
`
	if out, err := pg.PSQL(t, pg.Host, pg.Port, "-q", "-c", script); err != nil {
		t.Fatalf("create/insert: %v\n%s", err, out)
	}
	out, err = pg.PSQL(t, pg.Host, pg.Port, "-tA", "-F", ",", "-c", "select id, name from items order by id")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(out)), "1,one\n2,two\n3,three"; got != want {
		t.Errorf("select = %q, want %q", got, want)
	}

	// ON_ERROR_STOP: a failing statement is an error.
	if _, err := pg.PSQL(t, pg.Host, pg.Port, "-c", "select * from no_such_table"); err == nil {
		t.Error("query on a missing table succeeded")
	} else if !strings.Contains(err.Error(), "no_such_table") {
		t.Errorf("error does not carry psql's stderr: %v", err)
	}
}

func TestRedis(t *testing.T) {
	t.Parallel()
	start := time.Now()
	r := testservers.Redis(t)
	t.Logf("redis ready in %v at %s", time.Since(start).Round(time.Millisecond), r.Addr())

	out, err := r.CLI(t, r.Host, r.Port, "SET", "greeting", "hello world")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "OK" {
		t.Fatalf("SET = %q", got)
	}
	out, err = r.CLI(t, r.Host, r.Port, "GET", "greeting")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "hello world" {
		t.Fatalf("GET = %q", got)
	}
	out, err = r.CLI(t, r.Host, r.Port, "INCR", "counter")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "1" {
		t.Fatalf("INCR = %q", got)
	}
}

func TestSSHD(t *testing.T) {
	t.Parallel()
	start := time.Now()
	s := testservers.SSHD(t)
	t.Logf("sshd ready in %v at %s (user %s)", time.Since(start).Round(time.Millisecond), s.Addr(), s.User)

	out, err := s.SSH(t, s.Host, s.Port, "echo", "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "hello" {
		t.Fatalf("ssh echo = %q", got)
	}
	out, err = s.SSH(t, s.Host, s.Port, "id -un")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != s.User {
		t.Errorf("remote user = %q, want %q", got, s.User)
	}

	// scp round trip with checksum.
	dir := t.TempDir()
	payload := make([]byte, 200<<10)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	local := filepath.Join(dir, "payload.bin")
	if err := os.WriteFile(local, payload, 0o644); err != nil {
		t.Fatal(err)
	}
	remote := filepath.Join(s.Dir, "uploaded.bin")
	if err := s.SCP(t, s.Host, s.Port, local, remote, true); err != nil {
		t.Fatalf("scp upload: %v", err)
	}
	want := sha256.Sum256(payload)
	out, err = s.SSH(t, s.Host, s.Port, "sha256sum", remote)
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(out)); len(f) == 0 || f[0] != hex.EncodeToString(want[:]) {
		t.Errorf("remote sha256sum = %q, want %x", out, want)
	}
	back := filepath.Join(dir, "downloaded.bin")
	if err := s.SCP(t, s.Host, s.Port, back, remote, false); err != nil {
		t.Fatalf("scp download: %v", err)
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != want || !bytes.Equal(got, payload) {
		t.Errorf("downloaded file differs (%d bytes, want %d)", len(got), len(payload))
	}

	// A failing remote command is an error.
	if _, err := s.SSH(t, s.Host, s.Port, "exit 3"); err == nil {
		t.Error("ssh 'exit 3' succeeded")
	}
}

func TestDNS(t *testing.T) {
	t.Parallel()
	start := time.Now()
	d := testservers.DNS(t, map[string]string{
		"svc.portway.test":   "127.1.2.3",
		"v6.portway.test":    "::1",
		"note.portway.test":  testservers.TXTPrefix + "hello tunnel",
		"multi.portway.test": "127.4.5.6",
	})
	t.Logf("dnsmasq ready in %v at %s", time.Since(start).Round(time.Millisecond), d.Addr())

	tests := []struct {
		name, qtype string
		opts        []string
		want        []string
	}{
		{"svc.portway.test", "A", nil, []string{"127.1.2.3"}},
		{"multi.portway.test", "A", nil, []string{"127.4.5.6"}},
		{"v6.portway.test", "AAAA", nil, []string{"::1"}},
		{"note.portway.test", "TXT", nil, []string{`"hello tunnel"`}},
		{"svc.portway.test", "A", []string{"+tcp"}, []string{"127.1.2.3"}},
		{"unknown.portway.test", "A", nil, nil},
	}
	for _, tc := range tests {
		got, err := d.Dig(t, d.Host, d.Port, tc.name, tc.qtype, tc.opts...)
		if err != nil {
			t.Errorf("dig %s %s %v: %v", tc.name, tc.qtype, tc.opts, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("dig %s %s %v = %q, want %q", tc.name, tc.qtype, tc.opts, got, tc.want)
		}
	}
}

// TestParallelInstances starts two servers of one kind side by side: they must
// get different ports and not disturb each other.
func TestParallelInstances(t *testing.T) {
	t.Parallel()
	a, b := testservers.Redis(t), testservers.Redis(t)
	if a.Port == b.Port {
		t.Fatalf("both redis servers on port %d", a.Port)
	}
	if _, err := a.CLI(t, a.Host, a.Port, "SET", "k", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.CLI(t, b.Host, b.Port, "SET", "k", "b"); err != nil {
		t.Fatal(err)
	}
	out, err := a.CLI(t, a.Host, a.Port, "GET", "k")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "a" {
		t.Errorf("server a GET k = %q", got)
	}
}

func TestFreePort(t *testing.T) {
	seen := map[int]bool{}
	for _, network := range []string{"tcp", "udp", "tcp", "udp"} {
		p := testservers.FreePort(t, network)
		if p <= 0 || p > 65535 {
			t.Fatalf("FreePort(%s) = %d", network, p)
		}
		if seen[p] {
			t.Fatalf("FreePort returned %d twice", p)
		}
		seen[p] = true
		var err error
		if network == "tcp" {
			var l net.Listener
			l, err = net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err == nil {
				l.Close()
			}
		} else {
			var c net.PacketConn
			c, err = net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err == nil {
				c.Close()
			}
		}
		if err != nil {
			t.Errorf("FreePort(%s) = %d is not bindable: %v", network, p, err)
		}
	}
}

// recorder is a testing.TB that records Fatalf/Skipf instead of stopping.
type recorder struct {
	testing.TB
	fatal, skip string
}

type stopped struct{}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = format
	if len(args) > 0 {
		r.fatal = args[0].(string)
	}
	panic(stopped{})
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skip = format
	if len(args) > 0 {
		r.skip = args[0].(string)
	}
	panic(stopped{})
}

func requireMissing(t *testing.T) *recorder {
	r := &recorder{TB: t}
	func() {
		defer func() {
			if v := recover(); v != nil {
				if _, ok := v.(stopped); !ok {
					panic(v)
				}
			}
		}()
		testservers.Require(r, "portway-no-such-binary", "portway-fake-pkg")
		t.Error("Require returned for a missing binary")
	}()
	return r
}

func TestRequire(t *testing.T) {
	if p := testservers.Require(t, "sh", "dash"); !filepath.IsAbs(p) {
		t.Errorf("Require(sh) = %q, want an absolute path", p)
	}

	t.Setenv("CI", "")
	r := requireMissing(t)
	if r.fatal != "" || !strings.Contains(r.skip, "portway-fake-pkg") || !strings.Contains(r.skip, "scripts/install-test-deps.sh") {
		t.Errorf("local: fatal=%q skip=%q", r.fatal, r.skip)
	}

	t.Setenv("CI", "true")
	r = requireMissing(t)
	if r.skip != "" || !strings.Contains(r.fatal, "portway-fake-pkg") || !strings.Contains(r.fatal, "scripts/install-test-deps.sh") {
		t.Errorf("CI: fatal=%q skip=%q", r.fatal, r.skip)
	}
}
