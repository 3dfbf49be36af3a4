package testservers

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// PostgresServer is a running PostgreSQL server started by Postgres.
type PostgresServer struct {
	// Host is the address the server listens on: "127.0.0.1".
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// User is the superuser name; it authenticates without a password
	// (trust) from 127.0.0.1, ::1 and the unix socket.
	User string
	// Database is the name of an empty database owned by User.
	Database string
	// SocketDir is the directory holding the server's unix socket.
	SocketDir string
	// DataDir is the cluster's data directory.
	DataDir string
	// LogPath is the file receiving the server's stdout and stderr.
	LogPath string

	psql string
}

// Postgres user and database created by Postgres.
const (
	postgresUser     = "portway"
	postgresDatabase = "portway"
)

// Postgres starts a throwaway PostgreSQL cluster (initdb + postgres from the
// newest /usr/lib/postgresql/*/bin, Debian package "postgresql") listening on
// 127.0.0.1:<free port>, with fsync off, small shared_buffers, trust
// authentication, superuser User and database Database. It is stopped and
// deleted by t.Cleanup.
//
// PostgreSQL refuses to run as root. When the test runs as root, initdb and
// postgres run as the "postgres" system user (created by the Debian package),
// and the cluster lives in a directory below /tmp that this user can reach.
func Postgres(t testing.TB) *PostgresServer {
	t.Helper()
	initdb, postgres := postgresBinaries(t)
	psql := Require(t, "psql", "postgresql-client")

	// Run as postgres when root.
	var cred *syscall.Credential
	var uid, gid = -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			missing(t, fmt.Sprintf("testservers: tests run as root but the %q system user, which PostgreSQL must run as, does not exist: %v (Debian package \"postgresql\"; %s)", "postgres", err, installHint))
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	}

	base := serverDir(t, "postgres")
	// MkdirTemp makes base 0700; the postgres user must be able to traverse
	// it to reach the data and socket directories.
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatalf("testservers: postgres: %v", err)
	}
	dataDir := filepath.Join(base, "data")
	sockDir := filepath.Join(base, "sock")
	for _, d := range []string{dataDir, sockDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatalf("testservers: postgres: %v", err)
		}
		if uid >= 0 {
			if err := os.Chown(d, uid, gid); err != nil {
				t.Fatalf("testservers: postgres: %v", err)
			}
		}
	}
	// Clients (root or not) must be able to use the socket.
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatalf("testservers: postgres: %v", err)
	}
	logPath := filepath.Join(base, "postgres.log")

	// The server environment: no PG* variables from the caller, C locale.
	env := cleanEnv([]string{"PG", "LC_", "LANG="}, "LANG=C", "LC_ALL=C", "HOME="+base, "TZ=UTC")

	initLog := filepath.Join(base, "initdb.log")
	initCmd := exec.Command(initdb,
		"-D", dataDir,
		"-U", postgresUser,
		"--auth=trust",
		"--no-locale", "-E", "UTF8",
		"--no-sync",
		"--no-instructions",
	)
	initCmd.Dir = base
	initCmd.Env = env
	if cred != nil {
		initCmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	out, err := initCmd.CombinedOutput()
	_ = os.WriteFile(initLog, out, 0o644)
	if err != nil {
		t.Fatalf("testservers: postgres: initdb failed: %v\n--- initdb output ---\n%s", err, tailFile(initLog, 40, 8<<10))
	}

	// Explicit pg_hba.conf: trust for the unix socket, 127.0.0.1 and ::1 only.
	hba := "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
	if err := os.WriteFile(filepath.Join(dataDir, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatalf("testservers: postgres: %v", err)
	}
	if uid >= 0 {
		_ = os.Chown(filepath.Join(dataDir, "pg_hba.conf"), uid, gid)
	}

	s := &PostgresServer{
		Host:      "127.0.0.1",
		User:      postgresUser,
		Database:  postgresDatabase,
		SocketDir: sockDir,
		DataDir:   dataDir,
		LogPath:   logPath,
		psql:      psql,
	}
	_, port := startServer(t, "postgres", func() int { return FreePort(t, "tcp") },
		func(port int) *process {
			cmd := exec.Command(postgres,
				"-D", dataDir,
				"-p", strconv.Itoa(port),
				"-k", sockDir,
				"-c", "listen_addresses=127.0.0.1",
				"-c", "fsync=off",
				"-c", "synchronous_commit=off",
				"-c", "full_page_writes=off",
				"-c", "shared_buffers=16MB",
				"-c", "max_connections=50",
				"-c", "logging_collector=off",
				"-c", "log_destination=stderr",
				"-c", "log_connections=off",
				"-c", "ssl=off",
			)
			cmd.Dir = base
			cmd.Env = env
			if cred != nil {
				cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
			}
			// SIGINT is PostgreSQL's "fast shutdown": it disconnects clients.
			// SIGTERM ("smart") would wait for open sessions, e.g. ones held
			// by a tunnel, to end by themselves.
			return startProcess(t, "postgres", cmd, logPath, syscall.SIGINT)
		},
		func(port int) error {
			out, err := s.psqlDB(t, "127.0.0.1", port, "postgres", "-tAc", "select 1")
			if err != nil {
				return err
			}
			if strings.TrimSpace(string(out)) != "1" {
				return fmt.Errorf("select 1 returned %q", out)
			}
			return nil
		})
	s.Port = port

	if out, err := s.psqlDB(t, s.Host, s.Port, "postgres", "-c", fmt.Sprintf(`CREATE DATABASE %q OWNER %q`, postgresDatabase, postgresUser)); err != nil {
		t.Fatalf("testservers: postgres: creating database: %v\n%s\n--- tail of %s ---\n%s", err, out, logPath, tailFile(logPath, 40, 8<<10))
	}
	return s
}

// Addr returns "127.0.0.1:<port>" of the server.
func (s *PostgresServer) Addr() string { return hostPort(s.Host, s.Port) }

// PSQL runs the real psql client against host:port (the server itself or,
// typically, a tunnel endpoint leading to it) as User on Database, with
// -X (no psqlrc), -w (never prompt for a password), -v ON_ERROR_STOP=1,
// PGCONNECT_TIMEOUT=10 and PGSSLMODE=disable (the server has no TLS), and no
// other PG* variables from the environment, followed by args (e.g. "-tAc", "select 1"). It returns
// psql's stdout; on failure the error contains psql's stderr.
func (s *PostgresServer) PSQL(t testing.TB, host string, port int, args ...string) ([]byte, error) {
	t.Helper()
	return s.psqlDB(t, host, port, s.Database, args...)
}

func (s *PostgresServer) psqlDB(t testing.TB, host string, port int, db string, args ...string) ([]byte, error) {
	t.Helper()
	full := append([]string{
		"-X", "-w", "-v", "ON_ERROR_STOP=1",
		"-h", host, "-p", strconv.Itoa(port), "-U", s.User, "-d", db,
	}, args...)
	env := cleanEnv([]string{"PG"}, "PGCONNECT_TIMEOUT=10", "PGSSLMODE=disable", "PGAPPNAME=testservers")
	return runClient(t, env, s.psql, full...)
}

// postgresBinaries returns initdb and postgres from the newest
// /usr/lib/postgresql/*/bin holding both, else from PATH.
func postgresBinaries(t testing.TB) (initdb, postgres string) {
	t.Helper()
	for _, d := range postgresBinDirs() {
		i, p := filepath.Join(d, "initdb"), filepath.Join(d, "postgres")
		if isExecutable(i) && isExecutable(p) {
			return i, p
		}
	}
	return Require(t, "initdb", "postgresql"), Require(t, "postgres", "postgresql")
}
