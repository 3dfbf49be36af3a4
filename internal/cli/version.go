package cli

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"
)

// Build describes the binary: what scripts/release.sh stamps into it with
// -ldflags -X, and what the Go toolchain recorded.
type Build struct {
	// Version is the release ("v1.2.3"), or "dev".
	Version string
	// Commit is the source revision; empty: the one Go recorded, if any.
	Commit string
	// GoVersion is the toolchain; empty: runtime.Version().
	GoVersion string
	// Tags are the build tags (nokubernetes); nil: the ones Go recorded.
	Tags []string
}

// fill completes b from the build information Go embeds in every binary,
// so a plain `go build` in a checkout still names its commit and tags.
func (b Build) fill() Build {
	if b.Version == "" {
		b.Version = "dev"
	}
	if b.GoVersion == "" {
		b.GoVersion = runtime.Version()
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			if b.Commit == "" {
				b.Commit = s.Value
			}
		case "-tags":
			if b.Tags == nil && s.Value != "" {
				b.Tags = strings.Split(s.Value, ",")
			}
		}
	}
	return b
}

// String is what `portway version` and `portway --version` print: the
// version on the first line, then one "key: value" per line.
func (b Build) String() string {
	commit, tags := b.Commit, strings.Join(b.Tags, ",")
	if commit == "" {
		commit = "unknown"
	}
	if tags == "" {
		tags = "none"
	}
	return fmt.Sprintf("portway %s\ncommit:     %s\ngo:         %s %s/%s\nbuild tags: %s\n",
		b.Version, commit, b.GoVersion, runtime.GOOS, runtime.GOARCH, tags)
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version, commit, Go version and build tags",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprint(a.stdout, a.build.String())
			return nil
		},
	}
}

// newToken returns a random agent token (256 bits, URL-safe base64) and the
// hex SHA-256 that the gateway's token_sha256 wants.
func newToken() (token, sum string, err error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", "", fmt.Errorf("token: %w", err)
	}
	token = base64.RawURLEncoding.EncodeToString(b)
	h := sha256.Sum256([]byte(token))
	return token, hex.EncodeToString(h[:]), nil
}

func (a *app) tokenCmd() *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Make a new agent token and print the line for the gateway's config",
		Long: `Make a new agent token. The first line is the token, for the agent
(PORTWAY_GATEWAY_TOKEN or gateway.token); the second is the agents: entry for
gateway.yaml, which holds only the token's SHA-256.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			token, sum, err := newToken()
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "token: %s\n", token)
			fmt.Fprintf(a.stdout, "  - {name: %q, token_sha256: %q}\n", name, sum)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "my-agent", "the agent's name in the gateway's agents: list")
	return cmd
}
