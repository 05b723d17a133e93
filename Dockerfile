# A static binary in an empty image, running as a non-root user.
#   docker build -t matrix-user-operator:0.1.0 .
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
COPY tests tests
COPY benches benches
COPY testkit testkit
RUN cargo build --release --locked --bin matrix-user-operator \
 && strip target/release/matrix-user-operator

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/matrix-user-operator /matrix-user-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/matrix-user-operator"]
CMD ["run", "--log-format=json"]
