"""The mobile app: `edgelm app build` packs artifacts, the router and the web app into a servable folder;
`edgelm app serve` serves it (COOP/COEP for threads) and proxies /v1 to the cloud."""
