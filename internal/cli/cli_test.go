package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testwait"
)

func waitFor(t *testing.T, b *testlog.Buffer, substr string) {
	t.Helper()
	if !testwait.Until(15*time.Second, func() bool { return strings.Contains(b.String(), substr) }) {
		t.Fatalf("output never contained %q:\n%s", substr, b.String())
	}
}

// TestUpThenStatus runs the quick start as a user would, talks to its echo
// endpoint, checks `portway status` against it (table and JSON), and stops
// it. Logs are JSON with --log-format json.
func TestUpThenStatus(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errOut testlog.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Main(ctx, []string{"--log-format", "json", "up", "--port-range", "31000-31999", "--admin-listen", "127.0.0.1:0"}, "test", &out, &errOut)
	}()
	waitFor(t, &out, "Press Ctrl-C")

	m := regexp.MustCompile(`echo\s+tcp\s+\S+\s+(127\.0\.0\.1:\d+)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("no echo endpoint in:\n%s", out.String())
	}
	c, err := net.DialTimeout("tcp", m[1], 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintln(c, "hello through up")
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || line != "hello through up\n" {
		t.Fatalf("echo: %q %v", line, err)
	}

	sm := regexp.MustCompile(`portway status --gateway (\S+) --token (\S+)`).FindStringSubmatch(out.String())
	if sm == nil {
		t.Fatalf("no status hint in:\n%s", out.String())
	}
	var st, stErr bytes.Buffer
	if code := Main(ctx, []string{"status", "--gateway", sm[1], "--token", sm[2]}, "test", &st, &stErr); code != 0 {
		t.Fatalf("status exit %d: %s", code, stErr.String())
	}
	for _, want := range []string{"local", "connected", "echo", m[1], "tunnel"} {
		if !strings.Contains(st.String(), want) {
			t.Errorf("status table lacks %q:\n%s", want, st.String())
		}
	}
	st.Reset()
	if code := Main(ctx, []string{"status", "--gateway", sm[1], "--token", sm[2], "-o", "json"}, "test", &st, &stErr); code != 0 {
		t.Fatalf("status -o json exit %d: %s", code, stErr.String())
	}
	var js struct {
		Agents   []struct{ Name string } `json:"agents"`
		Services []struct {
			ID       string `json:"id"`
			Endpoint string `json:"endpoint"`
			BytesIn  float64
		} `json:"services"`
	}
	if err := json.Unmarshal(st.Bytes(), &js); err != nil || len(js.Agents) != 1 || len(js.Services) != 1 || js.Services[0].Endpoint != m[1] {
		t.Fatalf("status json: %v %s", err, st.String())
	}
	stErr.Reset()
	if code := Main(ctx, []string{"status", "--gateway", sm[1], "--token", "wrong"}, "test", io.Discard, &stErr); code == 0 || !strings.Contains(stErr.String(), "HTTP 401") {
		t.Errorf("status with a wrong token: exit %d, %q", code, stErr.String())
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("up exited %d: %s", code, errOut.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("up did not stop")
	}
	for _, l := range strings.Split(strings.TrimSpace(errOut.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec["msg"] == nil {
			t.Fatalf("log line is not JSON: %q", l)
		}
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{"agent", "--gateway-url", "http://nope", "--token", "x"}, "test", &out, &errOut)
	if code == 0 || !strings.Contains(errOut.String(), "gateway.url") {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	code = Main(context.Background(), []string{"--log-level", "loud", "version"}, "test", &out, &errOut)
	if code != 0 || !strings.Contains(out.String(), "portway test") {
		t.Fatalf("version: exit %d %q", code, out.String())
	}
	code = Main(context.Background(), []string{"--log-level", "loud", "gateway", "--insecure"}, "test", &out, &errOut)
	if code == 0 || !strings.Contains(errOut.String(), "--log-level") {
		t.Fatalf("bad log level: exit %d, stderr %q", code, errOut.String())
	}
}

// Plain ws:// to a host other than loopback needs --insecure (or
// gateway.insecure). With the flag, only the deliberately bad protocol is
// refused, so the agent never starts and dials nothing.
func TestAgentInsecureFlag(t *testing.T) {
	var out, errOut bytes.Buffer
	args := []string{"agent", "--gateway-url", "ws://gw.example.com:8443/v1/tunnel", "--token", "x", "--protocol", "smux"}
	code := Main(context.Background(), args, "test", &out, &errOut)
	if code == 0 || !strings.Contains(errOut.String(), "gateway.insecure") {
		t.Fatalf("without --insecure: exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	code = Main(context.Background(), append(args, "--insecure"), "test", &out, &errOut)
	if code == 0 || strings.Contains(errOut.String(), "gateway.url") || !strings.Contains(errOut.String(), "gateway.protocol") {
		t.Fatalf("with --insecure: exit %d, stderr %q", code, errOut.String())
	}
}

func TestParseExpose(t *testing.T) {
	s, err := parseExpose("redis=tcp://127.0.0.1:6379")
	if err != nil || s.Name != "redis" || s.Protocol != "tcp" || s.Port != 6379 || s.Backend != "127.0.0.1:6379" {
		t.Fatalf("%+v %v", s, err)
	}
	for _, bad := range []string{"redis", "=tcp://h:1", "x=http://h:1", "x=tcp://h", "x=udp://h:0"} {
		if _, err := parseExpose(bad); err == nil {
			t.Errorf("parseExpose(%q) accepted", bad)
		}
	}
}
