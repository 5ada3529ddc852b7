// gft-portforward serves the kubelet's port-forward API for the proving ground's runner node,
// with the kubelet's own code (k8s.io/kubelet's streaming/portforward: SPDY and WebSocket).
//
// The runner's kubelet API (Python, TLS) hands every /portForward/{namespace}/{pod} request to
// this process over a Unix socket, naming the pod's IP in the X-Gft-Pod-Ip header; each
// forwarded stream is a TCP connection to that IP and the requested port.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"
)

type toPod struct{ ip string }

func (p toPod) PortForward(ctx context.Context, name string, uid types.UID, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(p.ip, fmt.Sprint(port)))
	if err != nil {
		return fmt.Errorf("pod %s: port %d: %w", name, port, err)
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(conn, stream); done <- struct{}{} }()
	go func() { io.Copy(stream, conn); done <- struct{}{} }()
	<-done
	return nil
}

func main() {
	socket := flag.String("socket", "", "Unix socket to listen on")
	flag.Parse()
	os.Remove(*socket)
	listener, err := net.Listen("unix", *socket)
	if err != nil {
		log.Fatal(err)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// /portForward/{namespace}/{pod}[/{uid}]
		parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
		ip := r.Header.Get("X-Gft-Pod-Ip")
		if len(parts) < 3 || parts[0] != "portForward" || ip == "" {
			http.Error(w, "expected /portForward/{namespace}/{pod} and the pod's IP", http.StatusBadRequest)
			return
		}
		var uid types.UID
		if len(parts) > 3 {
			uid = types.UID(parts[3])
		}
		portforward.ServePortForward(w, r, toPod{ip}, parts[2], uid, &portforward.V4Options{},
			4*time.Hour, 30*time.Second, portforward.SupportedProtocols)
	})
	log.Fatal(http.Serve(listener, handler))
}
