package testservers

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// SSHDServer is a running OpenSSH server started by SSHD.
type SSHDServer struct {
	// Host is the address the server listens on: "127.0.0.1".
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// User is the account to log in as: the user running the test (root
	// when the tests run as root).
	User string
	// KeyPath is the client's private ed25519 key, authorized for User.
	KeyPath string
	// Dir is the server's private directory (config, keys, pid file, log).
	Dir string
	// LogPath is the file receiving the server's stdout and stderr.
	LogPath string

	ssh, scp string
}

// SSHD starts the real OpenSSH server (/usr/sbin/sshd, Debian package
// "openssh-server") in the foreground (-D -e -f <config>) on
// 127.0.0.1:<free port>, with its own config file, a throwaway ed25519 host
// key and a throwaway ed25519 client key pair (made with ssh-keygen) whose
// public key is the only authorized key. Only public-key authentication is
// allowed, PAM is off (unless the account's password is locked with "!",
// which sshd without PAM refuses even for key logins) and StrictModes is off, so it works in a temporary
// directory both as root (logging in as root; PermitRootLogin
// prohibit-password) and as a normal user (logging in as that user). scp works
// through the built-in SFTP server (Subsystem sftp internal-sftp). The ssh,
// scp and ssh-keygen clients (package "openssh-client") are required as well.
//
// When run as root, sshd requires its privilege separation directory
// /run/sshd to exist (normally made by the init script, which does not run
// here); SSHD creates it (mode 0755) if missing and leaves it in place, as the
// service would.
func SSHD(t testing.TB) *SSHDServer {
	t.Helper()
	sshd := Require(t, "sshd", "openssh-server")
	keygen := Require(t, "ssh-keygen", "openssh-client")
	sshBin := Require(t, "ssh", "openssh-client")
	scpBin := Require(t, "scp", "openssh-client")

	u, err := user.Current()
	if err != nil {
		t.Fatalf("testservers: sshd: current user: %v", err)
	}
	if os.Geteuid() == 0 {
		// Privilege separation directory, checked by sshd when root. It is
		// a system directory shared with a system sshd; leave it behind.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatalf("testservers: sshd: creating privilege separation directory /run/sshd: %v", err)
		}
		if _, err := user.Lookup("sshd"); err != nil {
			missing(t, fmt.Sprintf("testservers: sshd as root needs the \"sshd\" privilege separation user: %v (Debian package \"openssh-server\"; %s)", err, installHint))
		}
	}

	dir := serverDir(t, "sshd")
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	clientKey := filepath.Join(dir, "client_ed25519")
	for _, k := range []string{hostKey, clientKey} {
		cmd := exec.Command(keygen, "-q", "-t", "ed25519", "-N", "", "-C", "portway-testservers", "-f", k)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("testservers: sshd: ssh-keygen: %v\n%s", err, out)
		}
	}
	pub, err := os.ReadFile(clientKey + ".pub")
	if err != nil {
		t.Fatalf("testservers: sshd: %v", err)
	}
	authKeys := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authKeys, pub, 0o600); err != nil {
		t.Fatalf("testservers: sshd: %v", err)
	}
	usePAM := "no"
	if os.Geteuid() == 0 && shadowLocked(u.Username) {
		// With UsePAM no, a root-run sshd refuses accounts whose shadow
		// password starts with "!" ("account is locked"), even for key
		// logins. PAM does not, so use it for such an account.
		usePAM = "yes"
		t.Logf("testservers: sshd: account %s has a locked password; using UsePAM yes", u.Username)
	}
	logPath := filepath.Join(dir, "sshd.log")
	s := &SSHDServer{Host: "127.0.0.1", User: u.Username, KeyPath: clientKey, Dir: dir, LogPath: logPath, ssh: sshBin, scp: scpBin}

	_, port := startServer(t, "sshd", func() int { return FreePort(t, "tcp") },
		func(port int) *process {
			cfg := filepath.Join(dir, "sshd_config")
			conf := strings.Join([]string{
				"Port " + strconv.Itoa(port),
				"ListenAddress 127.0.0.1",
				"AddressFamily inet",
				"HostKey " + hostKey,
				"PidFile " + filepath.Join(dir, "sshd.pid"),
				"AuthorizedKeysFile " + authKeys,
				"PubkeyAuthentication yes",
				"PasswordAuthentication no",
				"KbdInteractiveAuthentication no",
				"HostbasedAuthentication no",
				"UsePAM " + usePAM,
				"StrictModes no",
				"PermitRootLogin prohibit-password",
				"AllowUsers " + u.Username,
				"AllowTcpForwarding yes",
				"X11Forwarding no",
				"PrintMotd no",
				"PrintLastLog no",
				"UseDNS no",
				"MaxStartups 100:30:200",
				"MaxSessions 50",
				"LoginGraceTime 30",
				"LogLevel VERBOSE",
				"Subsystem sftp internal-sftp",
				"",
			}, "\n")
			if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
				t.Fatalf("testservers: sshd: %v", err)
			}
			// sshd must be started by absolute path (it re-executes itself).
			cmd := exec.Command(sshd, "-D", "-e", "-f", cfg)
			cmd.Dir = dir
			return startProcess(t, "sshd", cmd, logPath, syscall.SIGTERM)
		},
		func(port int) error { return sshBanner(hostPort("127.0.0.1", port)) })
	s.Port = port
	return s
}

// shadowLocked reports whether name's /etc/shadow password field starts with
// "!", which OpenSSH on Linux treats as a locked account.
func shadowLocked(name string) bool {
	b, err := os.ReadFile("/etc/shadow")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) >= 2 && f[0] == name {
			return strings.HasPrefix(f[1], "!")
		}
	}
	return false
}

// sshBanner connects and expects an SSH-2.0 identification string.
func sshBanner(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "SSH-2.0-") {
		return fmt.Errorf("unexpected banner %q", line)
	}
	return nil
}

// Addr returns "127.0.0.1:<port>" of the server.
func (s *SSHDServer) Addr() string { return hostPort(s.Host, s.Port) }

// clientOpts are the options shared by ssh and scp: only our key, no user or
// system config, no host key checks, never prompt.
func (s *SSHDServer) clientOpts() []string {
	return []string{
		"-F", "/dev/null",
		"-i", s.KeyPath,
		"-o", "IdentitiesOnly=yes",
		"-o", "IdentityAgent=none",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=10",
		"-o", "LogLevel=ERROR",
	}
}

// SSH runs the real ssh client against host:port (the server itself or a
// tunnel endpoint leading to it), logging in as User with KeyPath, and runs
// remoteCmd there (joined by spaces and interpreted by the remote shell, as
// ssh does). It returns the command's stdout; on failure the error contains
// ssh's stderr. Options: -T, -F /dev/null, -i KeyPath, IdentitiesOnly=yes,
// StrictHostKeyChecking=no, UserKnownHostsFile=/dev/null, BatchMode=yes,
// ConnectTimeout=10, LogLevel=ERROR.
func (s *SSHDServer) SSH(t testing.TB, host string, port int, remoteCmd ...string) ([]byte, error) {
	t.Helper()
	args := append(s.clientOpts(), "-T", "-p", strconv.Itoa(port), s.User+"@"+host)
	args = append(args, remoteCmd...)
	return runClient(t, cleanEnv([]string{"SSH_AUTH_SOCK="}), s.ssh, args...)
}

// SCP copies one file with the real scp client through host:port (-P port),
// logging in as User with KeyPath and the same options as SSH. With upload
// true localPath is copied to remotePath on the server, else remotePath is
// copied to localPath. Relative remote paths are relative to User's home.
func (s *SSHDServer) SCP(t testing.TB, host string, port int, localPath, remotePath string, upload bool) error {
	t.Helper()
	h := host
	if strings.Contains(h, ":") {
		h = "[" + h + "]"
	}
	remote := s.User + "@" + h + ":" + remotePath
	args := append(s.clientOpts(), "-q", "-P", strconv.Itoa(port))
	if upload {
		args = append(args, localPath, remote)
	} else {
		args = append(args, remote, localPath)
	}
	_, err := runClient(t, cleanEnv([]string{"SSH_AUTH_SOCK="}), s.scp, args...)
	return err
}
