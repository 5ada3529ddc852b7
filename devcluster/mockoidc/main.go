// gft-mockoidc runs github.com/oauth2-proxy/mockoidc, a real OpenID Connect provider (discovery,
// authorization code flow, signed ID tokens, JWKS), as a process the dashboard's tests log in
// through with oauth2-proxy and Chromium. Every login is the user named by --email and --groups.
//
// It prints one line, "issuer: URL", once it listens.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/oauth2-proxy/mockoidc"
)

func main() {
	address := flag.String("address", "127.0.0.1:0", "host:port to listen on")
	clientID := flag.String("client-id", "gft-dashboard", "the OAuth client id")
	clientSecret := flag.String("client-secret", "", "the OAuth client secret (required)")
	email := flag.String("email", "ada@example.com", "the user every login signs in as")
	groups := flag.String("groups", "", "that user's groups, comma-separated")
	accessTTL := flag.Duration("access-ttl", 10*time.Minute, "lifetime of the tokens it issues")
	flag.Parse()
	if *clientSecret == "" {
		log.Fatal("--client-secret is required")
	}

	m, err := mockoidc.NewServer(nil)
	if err != nil {
		log.Fatal(err)
	}
	m.ClientID, m.ClientSecret, m.AccessTTL = *clientID, *clientSecret, *accessTTL
	user := &mockoidc.MockUser{
		Subject:           *email,
		Email:             *email,
		EmailVerified:     true,
		PreferredUsername: strings.Split(*email, "@")[0],
	}
	if *groups != "" {
		user.Groups = strings.Split(*groups, ",")
	}
	// mockoidc signs in whoever is queued (else its default user): queue ours for each login.
	err = m.AddMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == mockoidc.AuthorizationEndpoint {
				m.QueueUser(user)
			}
			next.ServeHTTP(w, r)
		})
	})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", *address)
	if err != nil {
		log.Fatal(err)
	}
	if err := m.Start(ln, nil); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("issuer: %s\n", m.Issuer())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	_ = m.Shutdown()
}
