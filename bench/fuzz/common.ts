export interface FuzzResult {
  requests: number;
  crashes: number;
  hangs: number;
  oob: number;
  rss_growth_mb: number;
}
export interface FuzzOptions {
  requestsPerDevice: number;
  seed: number;
  devices?: string[];
  log?: (line: string) => void;
}
