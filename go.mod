module github.com/portway/portway

go 1.26.8

require (
	github.com/gorilla/websocket v1.5.3
	github.com/libp2p/go-yamux/v5 v5.1.0
)

require (
	github.com/libp2p/go-buffer-pool v0.0.2 // indirect
	go.yaml.in/yaml/v2 v2.4.2 // indirect
	sigs.k8s.io/yaml v1.6.0 // indirect
)
