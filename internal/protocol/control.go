package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"time"
)

// Control message types: the "type" field of every JSON text message.
const (
	TypeGatewayHello    = "gateway_hello"
	TypeGatewayHelloAck = "gateway_hello_ack"
	TypeRegister        = "register"
	TypeRegisterAck     = "register_ack"
	TypeHeartbeat       = "heartbeat"
	TypeHeartbeatAck    = "heartbeat_ack"
	TypeError           = "error"

	// JSON mode stream messages.
	TypeTCPOpen       = "tcp_open"
	TypeTCPOpenResult = "tcp_open_result"
	TypeTCPData       = "tcp_data"
	TypeTCPClose      = "tcp_close"
	TypeUDPOpen       = "udp_open"
	TypeUDPOpenResult = "udp_open_result"
	TypeUDPData       = "udp_data"
	TypeUDPClose      = "udp_close"
	TypeCredit        = "credit"
)

// Protocol names offered in gateway_hello and chosen in gateway_hello_ack.
const (
	ProtocolYamux = "yamux"
	ProtocolJSON  = "json"
)

// Version is the control protocol version this build speaks.
const Version = 1

// Bounds the decoder enforces; the gateway applies its own, smaller quotas on
// top (for instance the number of services an agent may register).
const (
	MaxRegisterServices = 10000
	MinHeartbeat        = 50 * time.Millisecond
	MaxHeartbeat        = 10 * time.Minute
	MinMessageSize      = 64 << 10
	MaxMessageSize      = 64 << 20
	MinStreamWindow     = 16 << 10
	MaxStreamWindow     = 64 << 20

	// maxDurationMS is the most milliseconds a time.Duration holds: a
	// larger count would wrap when converted.
	maxDurationMS = math.MaxInt64 / int64(time.Millisecond)
)

// Message is any decoded control or JSON-mode stream message.
type Message interface {
	// Type returns the message's "type" field.
	Type() string
}

// Hello is gateway_hello: the first message on every tunnel, sent by the
// gateway. It offers protocols in order of preference and states the limits
// the agent must respect.
type Hello struct {
	Version             int      `json:"version"`
	Protocols           []string `json:"protocols"`
	HeartbeatIntervalMS int64    `json:"heartbeat_interval_ms"`
	MaxMessageSize      int      `json:"max_message_size"`
	MaxServices         int      `json:"max_services"`
	// StreamWindow is the initial per-stream credit, in bytes, in JSON mode.
	StreamWindow int    `json:"stream_window"`
	Agent        string `json:"agent,omitempty"` // the identity the token maps to
	PublicHost   string `json:"public_host,omitempty"`
	Server       string `json:"server,omitempty"` // gateway software version
	// Replica names the gateway process the agent reached. An agent
	// holding sessions to several replicas compares it to notice two
	// sessions that reached the same one (through a load balancer).
	// Empty from a gateway that does not send it.
	Replica string `json:"replica,omitempty"`
}

// HeartbeatInterval returns the interval as a duration.
func (h *Hello) HeartbeatInterval() time.Duration {
	return time.Duration(h.HeartbeatIntervalMS) * time.Millisecond
}

// Offers reports whether the hello offers protocol p.
func (h *Hello) Offers(p string) bool {
	for _, o := range h.Protocols {
		if o == p {
			return true
		}
	}
	return false
}

// HelloAck is gateway_hello_ack: the agent's choice of protocol.
type HelloAck struct {
	Version  int    `json:"version"`
	Protocol string `json:"protocol"`
	Client   string `json:"client,omitempty"` // agent software version
	// Instance names the agent process, so that a gateway can tell
	// several processes of one agent identity apart: a session of the
	// same instance replaces its older one, another instance's is kept
	// beside it. Empty from an agent that does not send it.
	Instance string `json:"instance,omitempty"`
}

// Service is one service in a register message.
type Service struct {
	// ID names the service for its whole life: a static service's name, or
	// namespace/gateway/listener for one discovered in Kubernetes.
	ID       string `json:"id"`
	Protocol Kind   `json:"protocol"`
	// Port is the port the service is known by; the gateway prefers
	// 10000+Port for the public port.
	Port int `json:"port"`
	// PublicPort asks for this exact public port (0: let the gateway choose).
	PublicPort int `json:"public_port,omitempty"`
	// IdleTimeoutMS is the service's idle timeout (TCP) or session timeout
	// (UDP), so that the gateway can enforce it too. 0: none.
	IdleTimeoutMS int64 `json:"idle_timeout_ms,omitempty"`
	// MaxDatagram is the largest UDP datagram the agent accepts for this
	// service; the gateway drops (and counts) larger ones from clients.
	MaxDatagram int `json:"max_datagram,omitempty"`
	// Mode is the routing mode, for display: ModeTunnel or ModeDual.
	Mode Mode `json:"mode,omitempty"`
	// ProxyProtocol is the PROXY protocol header the agent writes to the
	// backend ("v1", "v2"; empty: none). The gateway then sends the
	// public endpoint in each stream header (HeaderVersionPublic), and
	// shows the mode.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`
	// AllowCIDRs, when set, are the only client sources the gateway lets
	// in; DenyCIDRs are refused. The gateway enforces them within the
	// operator's ceiling for the agent, and refuses the service when
	// AllowCIDRs reaches outside that ceiling.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	DenyCIDRs  []string `json:"deny_cidrs,omitempty"`
	// MaxConnectionsPerSource bounds one client address's open
	// connections or UDP sessions; 0: no limit.
	MaxConnectionsPerSource int `json:"max_connections_per_source,omitempty"`
	// MaxConnectionRatePerSource bounds one client address's new
	// connections or UDP sessions per second, with bursts of
	// ConnectionBurstPerSource; 0: no limit.
	MaxConnectionRatePerSource float64 `json:"max_connection_rate_per_source,omitempty"`
	ConnectionBurstPerSource   int     `json:"connection_burst_per_source,omitempty"`
}

// Mode is a service's routing mode. Discovery reads it from a Kubernetes
// Gateway; a static service is always ModeTunnel. Only ModeTunnel and
// ModeDual services are registered with the gateway, which shows the mode.
type Mode string

// Routing modes.
const (
	// ModeTunnel exposes a service only through the portway gateway.
	ModeTunnel Mode = "tunnel"
	// ModeDirect leaves a service to its Gateway's own public address: it
	// is not registered with the portway gateway.
	ModeDirect Mode = "direct"
	// ModeDual registers a service with the portway gateway and reports
	// its direct endpoint as well.
	ModeDual Mode = "dual"
)

// Register is register: the agent's full desired set of services. It is
// idempotent and re-sent in full on every change and every reconnect.
type Register struct {
	Seq      uint64    `json:"seq"`
	Services []Service `json:"services"`
}

// Endpoint is the gateway's answer for one registered service.
type Endpoint struct {
	ID         string `json:"id"`
	Protocol   Kind   `json:"protocol"`
	PublicPort int    `json:"public_port,omitempty"`
	Address    string `json:"address,omitempty"` // public_host:public_port
	Error      string `json:"error,omitempty"`   // set when the service was not exposed
}

// RegisterAck is register_ack: one endpoint (or error) per service of the
// register message with the same Seq.
type RegisterAck struct {
	Seq       uint64     `json:"seq"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Heartbeat is heartbeat, sent by both sides every heartbeat interval.
type Heartbeat struct {
	Seq uint64 `json:"seq"`
	// TS is the sender's clock in nanoseconds; the ack echoes it, so the
	// sender measures the round trip on its own clock.
	TS int64 `json:"ts"`
}

// HeartbeatAck is heartbeat_ack, echoing a heartbeat's Seq and TS.
type HeartbeatAck Heartbeat

// Error is error: the reason a side is about to close the tunnel, or a
// complaint about one message that it otherwise ignores.
type Error struct {
	Code    ErrorCode `json:"code"`
	Message string    `json:"message"`
}

// ErrorCode is the code of an error message: why the sender closes the
// session. Both sides send only the codes below; a code from a peer is kept
// as it came (a newer peer may add some), so whoever turns one into a
// metric label maps it onto a fixed set first.
type ErrorCode string

// Error codes.
const (
	// CodeReplaced: a newer session of the same agent took over (sent by
	// the gateway to the older session).
	CodeReplaced ErrorCode = "replaced"
	// CodeShutdown: the gateway or the agent is stopping.
	CodeShutdown ErrorCode = "shutdown"
	// CodeNoProtocol: the agent found no protocol it speaks in the
	// gateway's hello, or the hello was invalid.
	CodeNoProtocol ErrorCode = "no_protocol"
	// CodeBadProtocol: the agent chose a protocol the gateway did not
	// offer.
	CodeBadProtocol ErrorCode = "bad_protocol"
	// CodeTokenRevoked: a reload removed the token the agent logged in
	// with, or its agent entry (sent by the gateway).
	CodeTokenRevoked ErrorCode = "token_revoked"
)

// Open is tcp_open or udp_open (JSON mode): the gateway opens stream ID.
type Open struct {
	Kind    Kind   `json:"-"`
	ID      uint32 `json:"id"`
	Service string `json:"service"`
	Client  string `json:"client,omitempty"`
	// Public is the public endpoint the client connected to
	// (StreamHeader.Public); sent only for services registered with a
	// proxy_protocol. Older agents ignore the field.
	Public string `json:"public,omitempty"`
}

// OpenResult is tcp_open_result or udp_open_result (JSON mode).
type OpenResult struct {
	Kind   Kind   `json:"-"`
	ID     uint32 `json:"id"`
	Status Status `json:"status"`
}

// Data is tcp_data or udp_data (JSON mode). Data is base64 on the wire.
// A udp_data message carries exactly one datagram.
type Data struct {
	Kind Kind   `json:"-"`
	ID   uint32 `json:"id"`
	Data []byte `json:"data"`
}

// Close is tcp_close or udp_close (JSON mode). Half means the sender has
// finished sending (a FIN) but still reads; otherwise the stream is gone in
// both directions.
type Close struct {
	Kind Kind   `json:"-"`
	ID   uint32 `json:"id"`
	Half bool   `json:"half,omitempty"`
}

// Credit is credit (JSON mode): the receiver of stream ID has consumed Bytes
// more bytes, and the sender may send that many more.
type Credit struct {
	ID    uint32 `json:"id"`
	Bytes uint32 `json:"bytes"`
}

// Type implementations.

func (*Hello) Type() string        { return TypeGatewayHello }
func (*HelloAck) Type() string     { return TypeGatewayHelloAck }
func (*Register) Type() string     { return TypeRegister }
func (*RegisterAck) Type() string  { return TypeRegisterAck }
func (*Heartbeat) Type() string    { return TypeHeartbeat }
func (*HeartbeatAck) Type() string { return TypeHeartbeatAck }
func (*Error) Type() string        { return TypeError }
func (*Credit) Type() string       { return TypeCredit }

func (m *Open) Type() string       { return kindType(m.Kind, TypeTCPOpen, TypeUDPOpen) }
func (m *OpenResult) Type() string { return kindType(m.Kind, TypeTCPOpenResult, TypeUDPOpenResult) }
func (m *Data) Type() string       { return kindType(m.Kind, TypeTCPData, TypeUDPData) }
func (m *Close) Type() string      { return kindType(m.Kind, TypeTCPClose, TypeUDPClose) }

func kindType(k Kind, tcp, udp string) string {
	if k == KindUDP {
		return udp
	}
	return tcp
}

// ErrBadMessage wraps every control message decoding failure.
var ErrBadMessage = errors.New("protocol: bad message")

// Encode returns the JSON text of m, with its "type" field first.
func Encode(m Message) ([]byte, error) {
	switch m := m.(type) {
	case *Data:
		return AppendData(nil, m.Kind, m.ID, m.Data), nil
	case *Credit:
		return AppendCredit(nil, m.ID, m.Bytes), nil
	case *Heartbeat:
		return AppendHeartbeat(make([]byte, 0, HeartbeatLen), false, m.Seq, m.TS), nil
	case *HeartbeatAck:
		return AppendHeartbeat(make([]byte, 0, HeartbeatLen), true, m.Seq, m.TS), nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("protocol: encode %s: %w", m.Type(), err)
	}
	// Every message is a non-empty JSON object; splice the type in front.
	out := make([]byte, 0, len(b)+len(m.Type())+12)
	out = append(out, `{"type":"`...)
	out = append(out, m.Type()...)
	out = append(out, '"')
	if len(b) > 2 {
		out = append(out, ',')
	}
	return append(out, b[1:]...), nil
}

// Decode parses and validates one JSON text message. Unknown fields are
// ignored (a newer peer may add some); an unknown type is an error.
func Decode(b []byte) (Message, error) {
	if d, ok := decodeDataFast(b); ok {
		return d, nil
	}
	if id, n, ok := ParseCreditFast(b); ok {
		return &Credit{ID: id, Bytes: n}, nil
	}
	if m, ok := parseHeartbeatFast(b); ok {
		return m, nil
	}
	var env struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadMessage, err)
	}
	var m Message
	switch env.Type {
	case TypeGatewayHello:
		m = new(Hello)
	case TypeGatewayHelloAck:
		m = new(HelloAck)
	case TypeRegister:
		m = new(Register)
	case TypeRegisterAck:
		m = new(RegisterAck)
	case TypeHeartbeat:
		m = new(Heartbeat)
	case TypeHeartbeatAck:
		m = new(HeartbeatAck)
	case TypeError:
		m = new(Error)
	case TypeCredit:
		m = new(Credit)
	case TypeTCPOpen, TypeUDPOpen:
		m = &Open{Kind: typeKind(env.Type)}
	case TypeTCPOpenResult, TypeUDPOpenResult:
		m = &OpenResult{Kind: typeKind(env.Type)}
	case TypeTCPData, TypeUDPData:
		m = &Data{Kind: typeKind(env.Type)}
	case TypeTCPClose, TypeUDPClose:
		m = &Close{Kind: typeKind(env.Type)}
	case "":
		return nil, fmt.Errorf("%w: missing \"type\"", ErrBadMessage)
	default:
		return nil, fmt.Errorf("%w: unknown type %q", ErrBadMessage, truncate(env.Type, 64))
	}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadMessage, env.Type, err)
	}
	if err := validate(m); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadMessage, env.Type, err)
	}
	return m, nil
}

func typeKind(t string) Kind {
	switch t {
	case TypeUDPOpen, TypeUDPOpenResult, TypeUDPData, TypeUDPClose:
		return KindUDP
	}
	return KindTCP
}

func validate(m Message) error {
	switch m := m.(type) {
	case *Hello:
		return m.Validate()
	case *HelloAck:
		if m.Protocol != ProtocolYamux && m.Protocol != ProtocolJSON {
			return fmt.Errorf("protocol %q is neither %q nor %q", truncate(m.Protocol, 32), ProtocolYamux, ProtocolJSON)
		}
	case *Register:
		return m.Validate()
	case *RegisterAck:
		if len(m.Endpoints) > MaxRegisterServices {
			return fmt.Errorf("%d endpoints, more than %d", len(m.Endpoints), MaxRegisterServices)
		}
		for i := range m.Endpoints {
			if k := m.Endpoints[i].Protocol; !k.Valid() {
				return fmt.Errorf("endpoints[%d]: %w", i, kindError(k))
			}
		}
	case *Open:
		if m.ID == 0 {
			return errors.New("id is 0")
		}
		if err := ValidateServiceID(m.Service); err != nil {
			return err
		}
		if m.Client != "" {
			if _, err := netip.ParseAddrPort(m.Client); err != nil {
				return fmt.Errorf("client: %w", err)
			}
		}
		if m.Public != "" {
			if _, err := netip.ParseAddrPort(m.Public); err != nil {
				return fmt.Errorf("public: %w", err)
			}
		}
	case *OpenResult:
		if m.ID == 0 {
			return errors.New("id is 0")
		}
	case *Data:
		if m.ID == 0 {
			return errors.New("id is 0")
		}
	case *Close:
		if m.ID == 0 {
			return errors.New("id is 0")
		}
	case *Credit:
		if m.ID == 0 {
			return errors.New("id is 0")
		}
		if m.Bytes == 0 {
			return errors.New("credit of 0 bytes")
		}
	}
	return nil
}

// Validate checks a hello before the agent acknowledges it, so that a hello
// the agent cannot honour is refused up front rather than after the ack.
func (h *Hello) Validate() error {
	if h.Version < 1 {
		return fmt.Errorf("version %d", h.Version)
	}
	if len(h.Protocols) == 0 || len(h.Protocols) > 16 {
		return fmt.Errorf("%d protocols offered", len(h.Protocols))
	}
	// Compare the milliseconds themselves: their product with
	// time.Millisecond can wrap back into the range.
	if ms := h.HeartbeatIntervalMS; ms < MinHeartbeat.Milliseconds() || ms > MaxHeartbeat.Milliseconds() {
		return fmt.Errorf("heartbeat_interval_ms %d outside [%d, %d]", h.HeartbeatIntervalMS, MinHeartbeat.Milliseconds(), MaxHeartbeat.Milliseconds())
	}
	if h.MaxMessageSize < MinMessageSize || h.MaxMessageSize > MaxMessageSize {
		return fmt.Errorf("max_message_size %d outside [%d, %d]", h.MaxMessageSize, MinMessageSize, MaxMessageSize)
	}
	if h.MaxServices < 1 || h.MaxServices > MaxRegisterServices {
		return fmt.Errorf("max_services %d outside [1, %d]", h.MaxServices, MaxRegisterServices)
	}
	if h.StreamWindow < MinStreamWindow || h.StreamWindow > MaxStreamWindow {
		return fmt.Errorf("stream_window %d outside [%d, %d]", h.StreamWindow, MinStreamWindow, MaxStreamWindow)
	}
	return nil
}

// Validate checks every service of a register message: valid ids, known
// protocols, ports in range, and no (id, protocol) pair twice.
func (r *Register) Validate() error {
	if len(r.Services) > MaxRegisterServices {
		return fmt.Errorf("%d services, more than %d", len(r.Services), MaxRegisterServices)
	}
	seen := make(map[ServiceKey]struct{}, len(r.Services))
	for i := range r.Services {
		s := &r.Services[i]
		if err := s.Validate(); err != nil {
			return fmt.Errorf("services[%d]: %w", i, err)
		}
		k := s.Key()
		if _, dup := seen[k]; dup {
			return fmt.Errorf("services[%d]: %s service %q listed twice", i, s.Protocol, s.ID)
		}
		seen[k] = struct{}{}
	}
	return nil
}

// Validate checks one service.
func (s *Service) Validate() error {
	if err := ValidateServiceID(s.ID); err != nil {
		return err
	}
	if !s.Protocol.Valid() {
		return fmt.Errorf("service %q: %w", s.ID, kindError(s.Protocol))
	}
	if s.Port < 1 || s.Port > 65535 {
		return fmt.Errorf("service %q: port %d outside 1-65535", s.ID, s.Port)
	}
	if s.PublicPort < 0 || s.PublicPort > 65535 {
		return fmt.Errorf("service %q: public_port %d outside 1-65535", s.ID, s.PublicPort)
	}
	if s.IdleTimeoutMS < 0 {
		return fmt.Errorf("service %q: negative idle_timeout_ms", s.ID)
	}
	if s.IdleTimeoutMS > maxDurationMS {
		return fmt.Errorf("service %q: idle_timeout_ms %d exceeds %d", s.ID, s.IdleTimeoutMS, maxDurationMS)
	}
	if s.MaxDatagram < 0 || s.MaxDatagram > MaxDatagram {
		return fmt.Errorf("service %q: max_datagram %d outside 0-%d", s.ID, s.MaxDatagram, MaxDatagram)
	}
	switch s.Mode {
	case "", ModeTunnel, ModeDual:
	default:
		return fmt.Errorf("service %q: mode %q is neither tunnel nor dual", s.ID, truncate(string(s.Mode), 32))
	}
	return nil
}

// ServiceKey identifies a service: the same id may exist once per protocol.
type ServiceKey struct {
	ID   string
	Kind Kind
}

// Key returns the service's key.
func (s *Service) Key() ServiceKey { return ServiceKey{ID: s.ID, Kind: s.Protocol} }

// kindError is the error for a missing or invalid protocol field: a JSON
// "protocol" other than "tcp" or "udp" fails in UnmarshalText already, so
// this one reports a field that was absent (or null).
func kindError(k Kind) error {
	if k == 0 {
		return errors.New(`protocol: missing protocol (want tcp or udp)`)
	}
	return fmt.Errorf("protocol: invalid kind %d (want tcp or udp)", uint8(k))
}

// String formats the key as "tcp/id".
func (k ServiceKey) String() string { return k.Kind.String() + "/" + k.ID }
