package tunnel

import "github.com/portway/portway/internal/relay"

// The relay finds the optional methods of a UDP stream by interface
// assertion: a JSON-mode stream's count of datagrams dropped on arrival
// (relay.DropCounter, reported as the queue_full drops) and the framed
// writes of a yamux-mode one. A renamed method would silently stop being
// used, so the stream types state here, at compile time, what they offer.
var (
	_ relay.PacketConn  = (*jsonStream)(nil)
	_ relay.DropCounter = (*jsonStream)(nil)
	_ relay.PacketConn  = (*framedPackets)(nil)
	_ interface {
		WriteFramed(frames []byte) error
	} = (*framedPackets)(nil)
)
