// Package config reads and validates the gateway's and the agent's YAML
// configuration files. The keys are a public interface (docs/configuration.md
// lists every one): unknown keys are errors, and every problem is reported
// with the key it concerns.
package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Duration is a time.Duration written as a Go duration string ("30s",
// "5m"). Parsing errors are kept and reported by Validate with the key name.
type Duration struct {
	time.Duration
	raw string
	bad bool
}

// D returns a Duration of d.
func D(d time.Duration) Duration { return Duration{Duration: d} }

// UnmarshalJSON accepts a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		d.raw, d.bad = string(b), true
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		d.raw, d.bad = s, true
		return nil
	}
	*d = Duration{Duration: v, raw: s}
	return nil
}

// MarshalJSON writes the duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.Duration.String()) }

// problems collects validation errors, each naming its key.
type problems []error

func (p *problems) add(key, format string, args ...any) {
	*p = append(*p, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
}

func (p problems) err() error { return errors.Join(p...) }

// duration checks a duration key: well formed, and within [min, max]
// (max 0: no upper bound). zeroOK allows 0 to mean "disabled".
func (p *problems) duration(key string, d Duration, min, max time.Duration, zeroOK bool) {
	switch {
	case d.bad:
		p.add(key, "%q is not a duration (write it like \"30s\" or \"5m\")", d.raw)
	case d.Duration == 0 && zeroOK:
	case d.Duration < min:
		p.add(key, "%v is below the minimum of %v", d.Duration, min)
	case max > 0 && d.Duration > max:
		p.add(key, "%v is above the maximum of %v", d.Duration, max)
	}
}

// logLevel checks a log level key; empty means the --log-level flag.
func (p *problems) logLevel(key, v string) {
	if v == "" {
		return
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(v)); err != nil {
		p.add(key, "%q is not debug, info, warn or error", v)
	}
}

func (p *problems) intRange(key string, v, min, max int) {
	if v < min || v > max {
		p.add(key, "%d is outside %d-%d", v, min, max)
	}
}

func (p *problems) hostPort(key, v string, required bool) {
	if v == "" {
		if required {
			p.add(key, "is required")
		}
		return
	}
	_, port, err := net.SplitHostPort(v)
	if err != nil {
		p.add(key, "%q is not host:port: %v", v, err)
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		p.add(key, "%q has an invalid port", v)
	}
}

// parseStrict unmarshals YAML into v, refusing unknown keys. name is the
// file's name, or "" for a document without one. It reports every unknown
// key and wrongly typed value at once, each with its line, and returns the
// key path → line index of the document for withLines.
func parseStrict(name string, data []byte, v any) (map[string]int, error) {
	lines, err := checkShape(name, data, v)
	if err != nil {
		return nil, err
	}
	if err := yaml.UnmarshalStrict(data, v); err != nil {
		err = cleanYAMLError(err)
		if name == "" {
			return nil, fmt.Errorf("config: %w", err)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return lines, nil
}

// cleanYAMLError trims the layers sigs.k8s.io/yaml puts around the message.
func cleanYAMLError(err error) error {
	msg := err.Error()
	for _, p := range []string{"error unmarshaling JSON: ", "while decoding JSON: "} {
		msg = strings.ReplaceAll(msg, p, "")
	}
	msg = strings.ReplaceAll(msg, "json: unknown field", "unknown key")
	return errors.New(msg)
}

func readFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return b, nil
}

// envName turns an agent name into the suffix of its token variable:
// "prod-eu" → "PROD_EU".
func envName(name string) string {
	var b strings.Builder
	for _, r := range strings.ToUpper(name) {
		if (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
